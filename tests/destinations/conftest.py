"""The fake destination server, one per test, on a free local port."""

from collections.abc import Iterator

import pytest

from tests.fixtures.fake_destinations import FakeDestinations


@pytest.fixture
def fake() -> Iterator[FakeDestinations]:
    with FakeDestinations() as server:
        yield server
