"""`explain` reads a fixed number of statements however many audiences there are: the
console's user page must not slow down as audiences are added."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from worker.domain import SyncRequest
from worker.reports import AudienceStanding, ReportService
from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, sync_all, write_config


def _apply_and_sync(runtime: Runtime, directory: Path, shop: ShopSource, count: int) -> None:
    """`count` audiences of the people flagged `a`, each sending to two file destinations."""
    destinations = {
        name: {"type": "file", "path": str(directory / f"{name}.ndjson")}
        for name in ("first", "second")
    }
    path = write_config(
        directory,
        source_url=shop.url,
        audiences=[
            audience(f"Audience {n:02d}", "a", destinations=list(destinations))
            for n in range(count)
        ],
        destinations=destinations,
    )
    apply_file(runtime, path)
    sync_all(runtime, SyncRequest())


def _counted_explain(runtime: Runtime, user_id: str) -> tuple[int, list[AudienceStanding]]:
    """How many statements one `explain` issues, and what it answers."""
    reports = ReportService(session_factory=runtime.sessions)
    reports.explain(user_id)  # the first call may open the pool's connection
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    event.listen(runtime.engine, "before_cursor_execute", count)
    try:
        standings = reports.explain(user_id)
    finally:
        event.remove(runtime.engine, "before_cursor_execute", count)
    return len(statements), standings


@pytest.fixture
def synced(shop: ShopSource) -> Iterator[ShopSource]:
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0), ("u3", None, 0, 0, 0)])
    yield shop


def test_explain_statements_do_not_grow_with_audiences(
    tmp_path: Path, synced: ShopSource, runtime: Runtime
) -> None:
    _apply_and_sync(runtime, tmp_path, synced, 2)
    synced.set_flag("a", ["u1"], 0)  # u1 leaves: history has an entry and an exit
    sync_all(runtime, SyncRequest())
    few, standings = _counted_explain(runtime, "u1")
    assert len(standings) == 2
    assert [[e.is_member for e in s.history] for s in standings] == [[True, False]] * 2

    synced.set_flag("a", ["u1"], 1)  # u1 is back: two more audiences' worth of history
    _apply_and_sync(runtime, tmp_path, synced, 10)
    many, standings = _counted_explain(runtime, "u1")
    assert len(standings) == 10
    assert all(s.is_member for s in standings)
    assert all(len(s.destinations) == 2 for s in standings)
    assert many == few
