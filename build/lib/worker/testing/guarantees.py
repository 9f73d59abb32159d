"""Helpers of the guarantee tests: destinations on the fake server, the source's truth,
state-database dumps and the command line run as a separate process."""

import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, create_engine, select
from typer.testing import CliRunner, Result

from worker.cli import app
from worker.runtime import Runtime
from worker.settings import get_settings
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config
from worker.testing.fake_destinations import FakeDestinations

if TYPE_CHECKING:  # pytest is a development dependency: needed to check, not to run
    import pytest

ORTTO_KEY_VARIABLE = "ORTTO_API_KEY"
ROOT = Path(__file__).resolve().parents[2]


def ortto_destination(fake: FakeDestinations, *, rate_limit: str = "1000/s") -> dict[str, Any]:
    """An `ortto` destination pointed at the fake server; the key comes from the env."""
    return {
        "type": "ortto",
        "api_key": "${" + ORTTO_KEY_VARIABLE + "}",
        "endpoint": fake.url,
        "rate_limit": rate_limit,
    }


def sync_to_fake(
    runtime: Runtime,
    directory: Path,
    shop: ShopSource,
    fake: FakeDestinations,
    *names: str,
    rate_limit: str = "1000/s",
    **extra: Any,
) -> Path:
    """Apply audiences named `names` (flags a, b, c in order) sending to the fake `ortto`
    destination; return the audiences file."""
    path = write_config(
        directory,
        source_url=shop.url,
        audiences=[
            audience(name, flag, destinations=["ortto"], **extra)
            for name, flag in zip(names, "abc", strict=False)
        ],
        destinations={"ortto": ortto_destination(fake, rate_limit=rate_limit)},
    )
    apply_file(runtime, path)
    return path


def wrong_values(state: Mapping[str, bool], members: Iterable[str]) -> dict[str, bool | None]:
    """Users whose value at the destination is not the source's truth (empty when it is):
    every member must hold `true`, every other user the destination knows `false`."""
    wanted = set(members)
    wrong: dict[str, bool | None] = {}
    for user in wanted | state.keys():
        value = state.get(user)
        if value is not (user in wanted) and not (value is None and user not in wanted):
            wrong[user] = value
    return wrong


def redundant_sends(items: Iterable[Mapping[str, Any]], key: str) -> int:
    """How many received contacts told a user the value the destination already held for
    `key`: the duplicates a retry or a re-run re-sent."""
    held: dict[str, bool] = {}
    count = 0
    for item in items:
        traits = item.get("traits") or {}
        if key not in traits:
            continue
        user = item.get("user_id") or item.get("anonymous_id")
        assert isinstance(user, str)
        count += held.get(user) is traits[key]
        held[user] = traits[key]
    return count


def dump_database(url: str) -> dict[str, list[tuple[str, ...]]]:
    """Every row of every table, as sorted tuples of text: compare two dumps, or grep one."""
    engine = create_engine(url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        with engine.connect() as connection:
            return {
                name: sorted(
                    tuple(repr(value) for value in row) for row in connection.execute(select(table))
                )
                for name, table in sorted(metadata.tables.items())
            }
    finally:
        engine.dispose()


def cli_env(state_url: str, **settings: str) -> dict[str, str]:
    """The environment of an `audience-sync` process on `state_url`: `settings` become
    AUDIENCE_SYNC_* variables (`crash_at="page_sent@2"`)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AUDIENCE_SYNC_") or key.startswith("AUDIENCE_SYNC_TEST_")
    }
    env["AUDIENCE_SYNC_DATABASE_URL"] = state_url
    for name, value in settings.items():
        env[f"AUDIENCE_SYNC_{name.upper()}"] = value
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `audience-sync ARGS...` as a separate process and wait for it."""
    return subprocess.run(
        cli_command(*args),
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(*args: str, env: Mapping[str, str]) -> "subprocess.Popen[str]":
    """Start `audience-sync ARGS...` as a separate process (to kill it)."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def point_cli_at(monkeypatch: "pytest.MonkeyPatch", state_url: str, **settings: str) -> None:
    """Make `invoke` (the CLI in this process) use `state_url` and these settings. Call
    `get_settings.cache_clear()` after the test too."""
    monkeypatch.setenv("AUDIENCE_SYNC_DATABASE_URL", state_url)
    for name, value in {
        "backoff_base_seconds": "0.01",
        "backoff_max_seconds": "0.05",
        "max_attempts": "3",
        **settings,
    }.items():
        monkeypatch.setenv(f"AUDIENCE_SYNC_{name.upper()}", value)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: no wrapped cells to assert on
    get_settings.cache_clear()


def invoke(*args: str) -> Result:
    """Run `audience-sync ARGS...` in this process; a bug's traceback is not swallowed."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]
