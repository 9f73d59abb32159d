"""Guarantee 10: API keys and source passwords never reach logs, messages shown to the
user, the sync history or the state database.

One session of commands goes through the paths that handle the key: apply, syncs that
succeed, are partly rejected, fail on 5xx, fail on a refused key, a malformed key, a
failing source; then every log record (at DEBUG), every output of the CLI and every row of
every table of the state database is searched for the secrets.
"""

import logging
import os
import uuid
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy.engine import make_url

from worker.settings import get_settings
from worker.testing.databases import ShopSource
from worker.testing.factories import audience, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    dump_database,
    invoke,
    ortto_destination,
    point_cli_at,
)

KEY = "secret_test"
SOURCE_VARIABLE = "SECRET_TEST_SOURCE_URL"


@pytest.fixture
def ortto_key() -> str:
    return f"pau-{uuid.uuid4().hex}"


def _source_url(shop: ShopSource, password: str) -> str:
    """The shop's URL, with a password when it is a server (trust auth ignores it)."""
    url = make_url(shop.url)
    if url.get_backend_name() == "sqlite":
        return shop.url
    return url.set(password=password).render_as_string(hide_password=False)


def test_secrets_never_leave_the_environment(
    tmp_path: Path,
    shop: ShopSource,
    state_url: str,
    fake: FakeDestinations,
    ortto_key: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = f"pw-{uuid.uuid4().hex}"
    secrets = [ortto_key, password]
    point_cli_at(monkeypatch, state_url)
    monkeypatch.setenv(ORTTO_KEY_VARIABLE, ortto_key)
    monkeypatch.setenv(SOURCE_VARIABLE, _source_url(shop, password))
    shop.add((f"u{i}", f"u{i}@example.com", 1, 0, 0) for i in range(6))
    path = write_config(
        tmp_path,
        source_url="${" + SOURCE_VARIABLE + "}",
        audiences=[audience("Secret Test", "a", destinations=["ortto"])],
        destinations={"ortto": ortto_destination(fake)},
    )
    results: list[Result] = []

    def run(*args: str, code: int) -> Result:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        results.append(result)
        return result

    try:
        run("apply", str(path), code=0)
        run("destinations", "check", code=0)
        run("sync", KEY, code=0)
        fake.reject_items(["u1"], message="bad contact")
        shop.set_flag("a", ["u1", "u2"], 0)
        run("sync", KEY, code=1)  # partial
        fake.add_fault("server_error", count=10)
        shop.set_flag("a", ["u3"], 0)
        run("sync", KEY, code=1)  # failed after its attempts
        fake.reset()
        monkeypatch.setenv(ORTTO_KEY_VARIABLE, f"pau-{uuid.uuid4().hex}")  # refused: 401
        secrets.append(os.environ[ORTTO_KEY_VARIABLE])
        run("destinations", "check", code=1)
        run("sync", KEY, code=1)
        monkeypatch.setenv(ORTTO_KEY_VARIABLE, f"X{uuid.uuid4().hex}")  # malformed
        secrets.append(os.environ[ORTTO_KEY_VARIABLE])
        run("apply", str(path), code=2)
        run("sync", KEY, code=1)
        monkeypatch.setenv(ORTTO_KEY_VARIABLE, ortto_key)
        shop.execute("alter table people rename column a to gone")  # the source breaks
        run("sync", KEY, code=1)
        for args in (
            ("history", "--json"),
            ("history",),
            ("failures", "--all"),
            ("status",),
            ("audiences", "list"),
        ):
            run(*args, code=0)
        run("runs", "show", "2", code=0)
        run("runs", "show", "2", "--json", code=0)
    finally:
        get_settings.cache_clear()

    shown = "\n".join(r.output for r in results)
    assert "invalid API key" in shown and "503" in shown and "malformed" in shown
    logged = caplog.text + "\n".join(repr(record.args) for record in caplog.records)
    dump = repr(dump_database(state_url))
    for secret in secrets:
        assert secret not in shown
        assert secret not in logged
        assert secret not in dump
    assert "${" + ORTTO_KEY_VARIABLE + "}" in dump  # the reference is what is stored
