"""Fixtures of the tests that run real `celery worker` processes (tests/test_celery_worker.py,
tests/test_broker.py): PostgreSQL state and source databases whatever the `backend`
parameter says (several processes share them), and the tests' own runtime on that state.

A module uses them by importing them, which overrides the conftest fixtures of the same name:

    from tests.worker_fixtures import ORTTO_KEY_VAR, runtime, shop, state_url  # noqa: F401
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.runtime import Runtime, build_runtime
from worker.settings import Settings
from worker.testing.databases import ShopSource, postgres_database, source_database
from worker.testing.fake_destinations import DEFAULT_ORTTO_KEY

# The variable the workers' Ortto destinations read their key from.
ORTTO_KEY_VAR = "TEST_ORTTO_KEY"


@pytest.fixture
def state_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[ShopSource]:
    with source_database("postgresql", tmp_path) as source:
        yield source


@pytest.fixture
def runtime(state_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """The test's own view of the state database (apply, in-process syncs, reading runs)."""
    monkeypatch.setenv(ORTTO_KEY_VAR, DEFAULT_ORTTO_KEY)
    rt = build_runtime(Settings(database_url=state_url))
    try:
        yield rt
    finally:
        rt.close()
