"""What an `audience-sync` process imports: the command line starts without the state
database's side and without the libraries only some commands use, and `sync` (without
`--enqueue`) never loads Celery. A check of which modules load, in a fresh process; never of
how long they take."""

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from worker.testing import IMPORT_ROOT
from worker.testing.databases import ShopSource, state_database
from worker.testing.factories import audience, write_config
from worker.testing.guarantees import cli_env, run_cli

# Prints the top-level packages loaded once the command line has run with the given
# arguments (none: only imported), whatever its exit status.
PROGRAM = """
import json, sys
from worker import cli
try:
    if sys.argv[1:]:
        sys.argv[0] = "audience-sync"
        cli.main()
finally:
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""
# Only `sync --enqueue` and the worker use these.
CELERY = {"celery", "kombu", "redis"}
# Only `console` and `metrics serve`.
SERVERS = {"starlette", "jinja2", "uvicorn", "prometheus_client"}
# Only the commands that open the state database, check its schema, load a configuration
# file or reach a destination (and their dependencies: mako and pygments come with alembic,
# pygments with httpx).
STATE_SIDE = {"sqlalchemy", "alembic", "mako", "psycopg", "httpx", "pygments", "models"}


def _loaded(*args: str, env: Mapping[str, str] | None = None) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-c", PROGRAM, *args],
        cwd=IMPORT_ROOT,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.stdout, completed.stderr
    loaded: list[str] = json.loads(completed.stdout.strip().splitlines()[-1])
    return set(loaded)


def test_importing_the_command_line_loads_none_of_the_heavy_libraries() -> None:
    loaded = _loaded()
    assert {"typer", "worker"} <= loaded
    assert loaded & (CELERY | SERVERS | STATE_SIDE) == set()


def test_help_loads_none_of_the_heavy_libraries() -> None:
    loaded = _loaded("--help")
    # typer lays out its help with rich.markdown, which brings pygments along.
    assert loaded & (CELERY | SERVERS | STATE_SIDE - {"pygments"}) == set()


def test_sync_without_enqueue_loads_neither_celery_nor_the_servers_nor_the_migrations(
    tmp_path: Path,
) -> None:
    source = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
    source.add([("u1", "u1@example.com", 1, 0, 0)])
    config = write_config(tmp_path, source_url=source.url, audiences=[audience("A", "a")])
    source.engine.dispose()
    with state_database("sqlite", tmp_path) as url:
        env = cli_env(url)
        assert run_cli("apply", str(config), env=env).returncode == 0
        loaded = _loaded("sync", "a", env=env)
    assert len((tmp_path / "identify.ndjson").read_text().splitlines()) == 1  # it synced
    assert "sqlalchemy" in loaded
    # The schema check reads the revision itself; the migrations load only when they run.
    assert loaded & (CELERY | SERVERS | {"alembic", "mako"}) == set()
