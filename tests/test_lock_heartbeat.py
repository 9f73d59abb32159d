"""A live run keeps its lock while it waits on something slow; a dead one loses it."""

import threading
import time
from pathlib import Path

import pytest

from worker.runtime import build_runtime
from worker.service import RunSummary, SyncRequest
from worker.settings import Settings
from worker.testing.databases import source_database, state_database
from worker.testing.factories import apply_file, audience, write_config

TTL = 5


@pytest.mark.postgres
def test_a_slow_source_query_keeps_the_lock_past_its_ttl(tmp_path: Path) -> None:
    with (
        state_database("postgresql", tmp_path) as state_url,
        source_database("postgresql", tmp_path) as shop,
    ):
        shop.add([("u1", None, 1, 0, 0)])
        runtime = build_runtime(Settings(database_url=state_url, lock_ttl_seconds=TTL))
        try:
            slow = {
                **audience("Slow", "a"),
                # The query takes well past the lock's TTL before it returns a row.
                "query": "select user_id, email from people cross join (select pg_sleep(8)) s "
                "where a = 1",
            }
            apply_file(
                runtime,
                write_config(tmp_path, source_url=shop.url, audiences=[slow]),
                check_queries=False,
            )
            [pair] = runtime.service.select_pairs()
            results: list[RunSummary] = []
            first = threading.Thread(
                target=lambda: results.append(runtime.service.sync_pair(pair, SyncRequest()))
            )
            first.start()
            time.sleep(TTL + 1.5)
            second = runtime.service.sync_pair(pair, SyncRequest())
            first.join(timeout=30)
        finally:
            runtime.close()
    assert second.status == "skipped", second
    assert "in progress" in (second.error or "")
    [done] = results
    assert (done.status, done.sent) == ("succeeded", 1)
