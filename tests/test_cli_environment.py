"""Broken environments, as a new operator meets them: a state database that is missing,
unreachable, not migrated or at an older revision, a `postgres://` URL, a bad setting, an
unreachable broker. Each is one line and exit status 2 (the traceback behind `--debug`),
and no command creates a file it was only asked to read."""

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from worker import cli, db, reports
from worker.settings import get_settings
from worker.testing.databases import ShopSource, postgres_database
from worker.testing.factories import audience, write_config
from worker.testing.guarantees import cli_env, error_lines, invoke, point_cli_at, run_cli

NOT_INITIALISED = "is not initialised: run `audience-sync db upgrade`"
READ_COMMANDS = (
    ("status",),
    ("status", "--json"),
    ("audiences", "list"),
    ("history",),
    ("history", "--json"),
    ("runs", "show", "1"),
    ("failures",),
    ("failures", "--json"),
)
# A mistyped PostgreSQL URL: nothing listens on port 1.
CLOSED_PORT_URL = "postgresql://audience:s3cret-pass@127.0.0.1:1/audience_sync"


@pytest.fixture(autouse=True)
def _fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A state database URL with no schema: a SQLite file that does not exist, or an empty
    PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
    else:
        with postgres_database(migrated=False) as url:
            yield url


def _shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _one_error(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert "Traceback" not in result.output
    return line


def test_commands_refuse_a_database_without_the_schema(
    empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_cli_at(monkeypatch, empty_database)
    expected = f"error: state database at {_shown_url(empty_database)} {NOT_INITIALISED}"
    config = write_config(tmp_path, source_url="sqlite://", audiences=[audience("A", "a")])
    for args in (*READ_COMMANDS, ("sync",), ("apply", str(config)), ("archive", "a")):
        assert _one_error(*args) == expected, args
    # A read leaves the disk as it was: no empty SQLite file to confuse `db upgrade` later.
    assert not (tmp_path / "state.db").exists()


def test_a_database_at_an_older_revision_is_refused_then_upgraded(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_cli_at(monkeypatch, empty_database)
    db.upgrade(empty_database, "0001")
    head = db.head_revision()
    line = _one_error("status")
    assert line.endswith(
        f"is at revision 0001, this version needs {head}: run `audience-sync db upgrade`"
    )
    upgraded = invoke("db", "upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.stdout.strip().endswith(f": upgraded from revision 0001 to {head}")
    assert invoke("status").exit_code == 0


def _stamp_newer_revision(url: str, revision: str) -> None:
    """The database as a newer version of audience-sync leaves it: at a revision this
    version's migrations do not know."""
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("update alembic_version set version_num = :v"), {"v": revision})
    finally:
        engine.dispose()


def test_a_database_at_a_newer_revision_says_this_version_is_older(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not `db upgrade`: there is nothing this version could upgrade it to.
    point_cli_at(monkeypatch, empty_database)
    _stamp_newer_revision(empty_database, "9999_from_the_future")
    head = db.head_revision()
    line = _one_error("status")
    assert line.endswith(
        f"is at revision 9999_from_the_future, newer than this version of audience-sync "
        f"knows (its newest is {head}): this audience-sync is older than the database; run "
        "the version that upgraded it"
    )
    assert "db upgrade" not in line


def test_db_upgrade_says_what_it_did(empty_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    point_cli_at(monkeypatch, empty_database)
    shown = _shown_url(empty_database)
    created = invoke("db", "upgrade")
    assert created.exit_code == 0, created.output
    head = db.head_revision()
    assert (
        created.stdout.strip()
        == f"state database at {shown}: created the schema at revision {head}"
    )
    again = invoke("db", "upgrade")
    assert again.stdout.strip() == f"state database at {shown}: already at revision {head}"
    assert invoke("status", "--json").stdout.strip() == "[]"


@pytest.mark.postgres
def test_unreachable_postgresql_is_one_line_with_the_password_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_cli_at(monkeypatch, CLOSED_PORT_URL)
    for args in (*READ_COMMANDS, ("db", "upgrade"), ("sync",)):
        line = _one_error(*args)
        assert line.startswith(
            "error: state database at postgresql://audience:***@127.0.0.1:1/audience_sync "
            "is unreachable ("
        ), line
        assert "s3cret-pass" not in line
    # The same as a separate process: stderr is that one line, whatever the entry point adds.
    result = run_cli("history", env=cli_env(CLOSED_PORT_URL))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "is unreachable (" in line and "s3cret-pass" not in line
    assert result.stdout == ""


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_urls_without_a_driver_are_postgresql(
    scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with postgres_database(migrated=False) as url:
        plain = make_url(url).set(drivername=scheme).render_as_string(hide_password=False)
        assert plain.startswith(f"{scheme}://")
        point_cli_at(monkeypatch, plain)
        created = invoke("db", "upgrade")
        assert created.exit_code == 0, created.output
        assert f"created the schema at revision {db.head_revision()}" in created.stdout
        listed = invoke("audiences", "list", "--json")
        assert (listed.exit_code, listed.stdout.strip()) == (0, "[]")


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_cli_at(monkeypatch, f"sqlite:///{tmp_path / 'missing.db'}")
    plain = invoke("status")
    assert "Traceback" not in plain.stderr
    debugged = invoke("--debug", "status")
    assert debugged.exit_code == 2
    assert "Traceback (most recent call last)" in debugged.stderr
    assert "StateDatabaseError" in debugged.stderr
    assert error_lines(debugged)[-1] == error_lines(plain)[0]


def test_a_bad_setting_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    point_cli_at(monkeypatch, f"sqlite:///{tmp_path / 'state.db'}", max_attempts="zero")
    line = _one_error("status")
    assert line.startswith("error: invalid setting AUDIENCE_SYNC_MAX_ATTEMPTS: ")
    point_cli_at(monkeypatch, "not a url")
    assert "state database URL cannot be parsed" in _one_error("history")
    point_cli_at(monkeypatch, f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    assert "cannot be created: the directory" in _one_error("db", "upgrade")


def test_an_unexpected_error_is_one_line_unless_debugging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What no command turned into a message (a bug) still leaves one line on stderr."""
    point_cli_at(monkeypatch, f"sqlite:///{tmp_path / 'state.db'}")
    db.upgrade(f"sqlite:///{tmp_path / 'state.db'}")

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(reports.ReportService, "audiences", boom)
    monkeypatch.setattr(sys, "argv", ["audience-sync", "audiences", "list"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unexpected RuntimeError: something broke (")
    monkeypatch.setattr(sys, "argv", ["audience-sync", "--debug", "audiences", "list"])
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main()


@pytest.fixture
def sqlite_state(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    db.upgrade(url)
    return url


def test_enqueue_to_an_unreachable_broker_is_one_line_within_5_seconds(
    sqlite_state: str, tmp_path: Path
) -> None:
    shop = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
    shop.engine.dispose()
    env = cli_env(sqlite_state, redis_url="redis://:hidden-pw@127.0.0.1:1/0")
    config = write_config(tmp_path, source_url=shop.url, audiences=[audience("A", "a")])
    assert run_cli("apply", str(config), env=env).returncode == 0
    started = time.monotonic()
    result = run_cli("sync", "--enqueue", env=env, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the broker at redis://:**@127.0.0.1:1/0 ("), line
    assert "hidden-pw" not in result.stderr
    assert elapsed < 5, elapsed
