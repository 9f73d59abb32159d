"""The service side of the Celery fan-out, in one process on SQLite and PostgreSQL: chunk
planning, chunks delivered in any order, a run closed once, and the due check of beat's tasks.
"""

import itertools
import logging
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from models import SyncRun
from worker.domain import ChunkRange, FanOut, RunSummary, SyncRequest, chunk_ranges
from worker.runtime import Runtime, build_runtime
from worker.service import SyncService
from worker.settings import Settings
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, read_calls, write_config


@pytest.mark.parametrize(
    ("boundaries", "expected"),
    [
        ([], [(None, None)]),
        (["u1"], [(None, "u1"), ("u1", None)]),
        (["a", "m", "t"], [(None, "a"), ("a", "m"), ("m", "t"), ("t", None)]),
    ],
)
def test_chunk_ranges_cover_the_changes_once(
    boundaries: list[str], expected: list[tuple[str | None, str | None]]
) -> None:
    chunks = chunk_ranges(boundaries)
    assert chunks == [ChunkRange(after, upto) for after, upto in expected]
    # Consecutive: each chunk starts where the previous one ended, the last is open.
    assert all(a.upto == b.after for a, b in itertools.pairwise(chunks))


def _setup(tmp_path: Path, shop: ShopSource, runtime: Runtime, users: int) -> int:
    shop.add((f"u{i:05d}", None, 1, 0, 0) for i in range(users))
    apply_file(runtime, write_config(tmp_path, source_url=shop.url, audiences=[audience("A", "a")]))
    return runtime.service.select_pairs()[0]


@pytest.fixture
def chunked(settings: Settings) -> Settings:
    return settings.model_copy(update={"chunk_size": 100})


@pytest.fixture
def chunked_runtime(chunked: Settings) -> Iterator[Runtime]:
    rt = build_runtime(chunked)
    try:
        yield rt
    finally:
        rt.close()


def test_small_run_is_delivered_without_fan_out(
    tmp_path: Path, shop: ShopSource, chunked_runtime: Runtime
) -> None:
    pair = _setup(tmp_path, shop, chunked_runtime, 99)
    outcome = chunked_runtime.service.start_sync(pair, SyncRequest())
    assert isinstance(outcome, RunSummary)
    assert (outcome.status, outcome.sent) == ("succeeded", 99)


def test_chunks_delivered_in_any_order_send_each_change_once(
    tmp_path: Path,
    shop: ShopSource,
    chunked_runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = chunked_runtime.service
    pair = _setup(tmp_path, shop, chunked_runtime, 1000)
    service.sync_pair(pair, SyncRequest())
    # 250 leave, 120 enter: 370 changes in chunks of 100.
    shop.set_flag("a", [f"u{i:05d}" for i in range(0, 1000, 4)], 0)
    shop.add((f"v{i:05d}", None, 1, 0, 0) for i in range(120))
    seen = len(read_calls(tmp_path / "identify.ndjson"))

    outcome = service.start_sync(pair, SyncRequest(trigger="schedule"))
    assert isinstance(outcome, FanOut)
    assert len(outcome.chunks) == 4
    chunks = list(outcome.chunks)
    random.Random(3).shuffle(chunks)
    for chunk in chunks:
        service.deliver_range(outcome.prepared, after=chunk.after, upto=chunk.upto)
    with caplog.at_level(logging.INFO, logger="audience_sync"):
        summary = service.finish_run(outcome.prepared)
        again = service.finish_run(outcome.prepared)
        late_failure = service.fail_run(outcome.prepared, "a late chunk failed")

    calls = read_calls(tmp_path / "identify.ndjson")[seen:]
    ids = [c["userId"] for c in calls]
    assert len(ids) == len(set(ids)) == 370
    assert sum(c["traits"]["a"] is False for c in calls) == 250
    assert (summary.status, summary.entered, summary.exited, summary.sent) == (
        "succeeded",
        120,
        250,
        370,
    )
    # Closed once: closing again changes nothing and logs nothing.
    assert again == late_failure == summary
    assert len([r for r in caplog.records if "sync finished" in r.getMessage()]) == 1
    assert not service.status()[0].is_running
    # The run closed by its fan-out's callback has its delivery timed, from the end of its
    # diff to that close.
    with chunked_runtime.sessions() as session:
        run = session.get(SyncRun, summary.run_id)
        assert run is not None and run.finished_at and run.delivery_started_at
        assert run.snapshot_seconds is not None and run.diff_seconds is not None
        assert run.delivery_seconds == pytest.approx(
            (run.finished_at - run.delivery_started_at).total_seconds()
        )
        assert run.delivery_seconds > 0


def test_is_due_follows_the_schedule_not_the_lock(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, settings: Settings
) -> None:
    pair = _setup(tmp_path, shop, runtime, 5)
    now = [datetime.now(UTC)]

    def service() -> SyncService:
        return SyncService(
            session_factory=runtime.sessions,
            settings=settings,
            destinations=runtime.destinations,
            clock=lambda: now[0],
        )

    assert service().is_due(pair) and service().due_pairs() == [pair]
    service().sync_pair(pair, SyncRequest(trigger="schedule"))
    now[0] += timedelta(hours=1, minutes=59)
    assert not service().is_due(pair) and service().due_pairs() == []
    now[0] += timedelta(minutes=1)
    assert service().is_due(pair) and service().due_pairs() == [pair]
