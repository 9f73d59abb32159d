"""Shared fixtures: state and source databases on both backends, a configured runtime, the
fake destination server and the command line pointed at the test's state database.

PostgreSQL and Redis tests carry the `postgres` / `redis` markers from collection on, so
`-m "not postgres and not redis"` leaves them out without touching either server.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.runtime import Runtime, build_runtime
from worker.settings import Settings, get_settings
from worker.testing.databases import (
    BACKENDS,
    ShopSource,
    drop_template,
    source_database,
    state_database,
)
from worker.testing.fake_destinations import DEFAULT_ORTTO_KEY, FakeDestinations
from worker.testing.guarantees import ORTTO_KEY_VARIABLE, point_cli_at

# Fixtures that reach a server whatever the backend parameter says.
_SERVER_FIXTURES = {"redis_client": "redis"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgresql":
            item.add_marker(pytest.mark.postgres)
        for fixture, marker in _SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(getattr(pytest.mark, marker))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_template()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def state_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with state_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def shop(backend: str, tmp_path: Path) -> Iterator[ShopSource]:
    with source_database(backend, tmp_path) as source:
        yield source


@pytest.fixture
def settings(state_url: str) -> Settings:
    return Settings(
        database_url=state_url,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
        max_attempts=3,
        read_timeout_seconds=2.0,
    )


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = build_runtime(settings)
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture
def ortto_key() -> str:
    """The key the fake Ortto endpoint accepts; a module overrides it for a key of its own."""
    return DEFAULT_ORTTO_KEY


@pytest.fixture
def fake(ortto_key: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDestinations]:
    """The fake destination server on a free port, its Ortto key in the environment (where
    `guarantees.ortto_destination` reads it), stopped after the test."""
    with FakeDestinations(ortto_key=ortto_key) as server:
        monkeypatch.setenv(ORTTO_KEY_VARIABLE, server.ortto_key)
        yield server


@pytest.fixture
def cli_settings() -> dict[str, str]:
    """AUDIENCE_SYNC_* settings of the `cli` fixture; a module overrides it."""
    return {}


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, state_url: str, cli_settings: dict[str, str]
) -> Iterator[None]:
    """The command line run in this process (`guarantees.invoke`) uses the test's state
    database and `cli_settings`."""
    point_cli_at(monkeypatch, state_url, **cli_settings)
    yield
    get_settings.cache_clear()
