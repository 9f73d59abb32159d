"""Shared fixtures: state and source databases on both backends, a configured runtime."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.databases import (
    BACKENDS,
    ShopSource,
    drop_template,
    source_database,
    state_database,
)
from worker.runtime import Runtime, build_runtime
from worker.settings import Settings


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_template()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        request.applymarker(pytest.mark.postgres)
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
