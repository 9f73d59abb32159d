"""The Celery tasks run by real `celery worker` processes on Redis, with PostgreSQL state.

Each test starts its own worker (prefork pool) on a queue of its own, drives it the way beat,
the CLI or Python would, and checks the sync history, the destination and the worker log.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from models import Audience, AudienceDestination, Destination, SyncRun
from tests import worker_fixtures
from tests.worker_fixtures import ORTTO_KEY_VAR
from worker.db import make_engine
from worker.domain import ChunkRange, FanOut, PreparedRun, SyncRequest
from worker.runtime import Runtime
from worker.tasks import ABANDONED, fan_out_chord
from worker.testing.celery_worker import ROOT, CeleryWorker, celery_beat, celery_worker, wait_for
from worker.testing.databases import ShopSource, postgres_database
from worker.testing.factories import apply_file, audience, read_calls, write_config
from worker.testing.fake_destinations import (
    DEFAULT_ORTTO_KEY,
    FakeDestinations,
    max_requests_in_window,
)

# PostgreSQL state and source databases, whatever the backend parameter says (they
# override the conftest fixtures of these names).
state_url, shop, runtime = worker_fixtures.state_url, worker_fixtures.shop, worker_fixtures.runtime

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

FINAL = ("succeeded", "partial", "failed", "skipped", "blocked")


def _worker(
    state_url: str, tmp_path: Path, *, concurrency: int = 3, **settings: object
) -> AbstractContextManager[CeleryWorker]:
    env = {f"AUDIENCE_SYNC_{name.upper()}": str(value) for name, value in settings.items()}
    env[ORTTO_KEY_VAR] = DEFAULT_ORTTO_KEY
    return celery_worker(
        database_url=state_url,
        log_path=tmp_path / "worker.log",
        concurrency=concurrency,
        env=env,
    )


def _ortto(fake: FakeDestinations, **extra: Any) -> dict[str, Any]:
    return {"type": "ortto", "api_key": f"${{{ORTTO_KEY_VAR}}}", "endpoint": fake.url, **extra}


def _people(shop: ShopSource, count: int, *, start: int = 0) -> None:
    """Users u{start}..u{count - 1}, all members of the audiences on flag `a`."""
    shop.add((f"u{i:05d}", f"u{i}@example.com", 1, 0, 0) for i in range(start, count))


def _slow_audience(name: str, *, seconds: float) -> dict[str, Any]:
    """An audience of flag `a` whose query first sleeps (once, as an init plan)."""
    return audience(name, "a") | {
        "query": "select user_id, email from people "
        f"where a = 1 and (select 1 from pg_sleep({seconds})) = 1"
    }


def _runs(runtime: Runtime, key: str | None = None) -> list[SyncRun]:
    """Runs, oldest first (optionally of one audience)."""
    with runtime.sessions() as session:
        query = select(SyncRun).order_by(SyncRun.id)
        if key is not None:
            query = query.join(Audience, Audience.id == SyncRun.audience_id).where(
                Audience.key == key
            )
        return list(session.scalars(query))


def _wait_runs(
    runtime: Runtime, count: int, *, key: str | None = None, timeout: float = 30
) -> list[SyncRun]:
    """Wait until `count` runs exist and all are closed; return them, oldest first."""

    def ready() -> list[SyncRun] | None:
        runs = _runs(runtime, key)
        return runs if len(runs) >= count and all(r.status in FINAL for r in runs) else None

    return wait_for(ready, timeout=timeout, what=f"{count} closed run(s)")


def _destination_names(runtime: Runtime) -> dict[int, str]:
    with runtime.sessions() as session:
        return {d.id: d.name for d in session.scalars(select(Destination))}


def _pair_ids(runtime: Runtime, key: str) -> list[int]:
    return runtime.service.select_pairs(audience_keys=[key])


def _lock_is_free(runtime: Runtime) -> bool:
    with runtime.sessions() as session:
        return all(p.lock_owner is None for p in session.scalars(select(AudienceDestination)))


# ----------------------------------------------------------------- schedule and triggers


def test_scheduled_tick_syncs_due_audience(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    _people(shop, 50)
    config = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Due Now", "a"), audience("Synced Already", "a", schedule="every 2h")],
    )
    apply_file(runtime, config)
    # Synced a moment ago by hand: not due for two hours.
    runtime.service.sync_pair(_pair_ids(runtime, "synced_already")[0], SyncRequest())
    due_pair = _pair_ids(runtime, "due_now")[0]

    with _worker(state_url, tmp_path, concurrency=2) as worker:
        assert worker.send("audience_sync.dispatch_due").get(timeout=30) == [due_pair]
        (run,) = _wait_runs(runtime, 1, key="due_now")
        # The next tick finds nothing due: the pair ran a moment ago.
        assert worker.send("audience_sync.dispatch_due").get(timeout=30) == []

    assert (run.status, run.trigger, run.mode) == ("succeeded", "schedule", "initial")
    assert run.sent == run.entered == run.members == 50
    assert len(_runs(runtime, "synced_already")) == 1
    sent = [c for c in read_calls(tmp_path / "identify.ndjson") if "due_now" in c["traits"]]
    assert len(sent) == 50
    assert len(worker.finished_lines()) == 1


def test_beat_and_worker_keep_a_new_audience_in_sync(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    _people(shop, 25)
    apply_file(runtime, write_config(tmp_path, source_url=shop.url, audiences=[audience("B", "a")]))

    with (
        _worker(state_url, tmp_path, concurrency=1) as worker,
        celery_beat(
            worker, schedule_path=tmp_path / "beat-schedule", log_path=tmp_path / "beat.log"
        ),
    ):
        (run,) = _wait_runs(runtime, 1)

    # No manual step: beat's tick found the new pair due and a worker ran its initial sync.
    assert (run.status, run.trigger, run.mode, run.sent) == ("succeeded", "schedule", "initial", 25)
    assert "audience_sync.dispatch_due" in (tmp_path / "beat.log").read_text()


def _run(worker: CeleryWorker, *command: str) -> str:
    """Run a command with the worker's environment (what an operator's shell would have)."""
    done = subprocess.run(
        list(command),
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_manual_full_sync_from_cli_and_python(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    _people(shop, 40)
    apply_file(
        runtime, write_config(tmp_path, source_url=shop.url, audiences=[audience("VIP", "a")])
    )
    runtime.service.sync_pair(_pair_ids(runtime, "vip")[0], SyncRequest())
    out = tmp_path / "identify.ndjson"
    assert len(read_calls(out)) == 40

    with _worker(state_url, tmp_path, concurrency=2) as worker:
        cli = str(Path(sys.executable).with_name("audience-sync"))
        printed = _run(worker, cli, "sync", "vip", "--enqueue", "--full")
        assert printed.startswith("queued task ")
        full = _wait_runs(runtime, 2, key="vip")[-1]
        # The documented Python call, from a fresh interpreter as an operator would make it.
        _run(
            worker,
            sys.executable,
            "-c",
            "from worker.tasks import sync_audience; print(sync_audience.delay('vip').id)",
        )
        incremental = _wait_runs(runtime, 3, key="vip")[-1]

    assert (full.mode, full.trigger, full.status) == ("full", "manual", "succeeded")
    assert full.sent == 40 and full.entered == 0  # every member re-sent; none was new
    assert (incremental.mode, incremental.trigger, incremental.status) == (
        "incremental",
        "manual",
        "succeeded",
    )
    assert incremental.sent == 0
    assert len(read_calls(out)) == 80


def test_overlapping_triggers_yield_one_run_and_skips(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    _people(shop, 30)
    # The query sleeps, so the first run still holds the pair when the others arrive.
    slow = _slow_audience("Slow", seconds=2)
    apply_file(
        runtime, write_config(tmp_path, source_url=shop.url, audiences=[slow]), check_queries=False
    )
    pair = _pair_ids(runtime, "slow")[0]
    request = {"trigger": "manual"}

    with _worker(state_url, tmp_path, concurrency=2) as worker:
        first = worker.send("audience_sync.sync_pair", pair, request)
        second = worker.send("audience_sync.sync_pair", pair, request)
        # A third trigger meanwhile, the way `audience-sync sync` runs one: in this process.
        wait_for(lambda: not _lock_is_free(runtime), timeout=10, what="a run to hold the pair")
        in_process = runtime.service.sync_pair(pair, SyncRequest())
        results = [first.get(timeout=30), second.get(timeout=30)]
        runs = _wait_runs(runtime, 3, key="slow")
        lines = worker.finished_lines()

    statuses = sorted(r["status"] for r in results)
    assert statuses == ["skipped", "succeeded"], results
    assert in_process.status == "skipped"
    assert sorted(r.status for r in runs) == ["skipped", "skipped", "succeeded"]
    for run in runs:
        if run.status == "skipped":
            assert run.error is not None and "in progress" in run.error
    assert len(read_calls(tmp_path / "identify.ndjson")) == 30  # one run sent, once
    assert len(lines) == 1
    assert _lock_is_free(runtime)


# ----------------------------------------------------------------- fan-out delivery


def _ortto_config(
    tmp_path: Path, shop: ShopSource, fake: FakeDestinations, **destination: Any
) -> Path:
    return write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Big", "a", destinations=["ortto"])],
        destinations={"ortto": _ortto(fake, **destination)},
    )


def _ids_received(fake: FakeDestinations) -> list[str]:
    return [item["user_id"] for item in fake.items("ortto")]


def test_fan_out_over_three_processes_delivers_each_change_once(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    _people(shop, 1000)
    apply_file(runtime, _ortto_config(tmp_path, shop, fake, rate_limit="100/s"))
    pair = _pair_ids(runtime, "big")[0]
    rejected = [f"u{i:05d}" for i in (250, 333, 999)]
    fake.reject_items(rejected, message="bad contact")

    with _worker(state_url, tmp_path, concurrency=3, chunk_size=60) as worker:
        started = worker.send("audience_sync.sync_pair", pair, {"trigger": "manual"}).get(
            timeout=30
        )
        (first,) = _wait_runs(runtime, 1)
        received_first = _ids_received(fake)

        # Churn: 200 leave, 100 new ones enter; the rejected three are tried again.
        fake.reset()
        shop.set_flag("a", [f"u{i:05d}" for i in range(200)], 0)
        _people(shop, 1100, start=1000)
        worker.send("audience_sync.sync_pair", pair, {"trigger": "manual"}).get(timeout=30)
        second = _wait_runs(runtime, 2)[-1]
        chunk_processes = worker.processes_that_ran("audience_sync.deliver_chunk")
        lines = worker.finished_lines()

    assert started["status"] == "running" and started["chunks"] == 1000 // 60 + 1
    assert (first.status, first.mode) == ("partial", "initial")
    assert (first.members, first.entered, first.exited) == (1000, 1000, 0)
    assert (first.sent, first.failed) == (997, 3)
    assert len(received_first) == len(set(received_first)) == 997  # each change exactly once
    assert set(received_first) == {f"u{i:05d}" for i in range(1000)} - set(rejected)

    received = _ids_received(fake)
    assert (second.status, second.mode) == ("succeeded", "incremental")
    # Those who left get false; newcomers and the three rejected last time get true.
    assert (second.members, second.entered, second.exited) == (900, 103, 200)
    assert (second.sent, second.failed) == (303, 0)
    assert len(received) == len(set(received)) == 303  # each change exactly once
    expected = {f"u{i:05d}": False for i in range(200)}
    expected |= {f"u{i:05d}": True for i in range(1000, 1100)}
    expected |= dict.fromkeys(rejected, True)
    assert fake.state("ortto")["big"] == expected

    assert len(chunk_processes) >= 2, chunk_processes  # the chunks really spread out
    assert len(lines) == 2  # each run finalised once
    finished = [json.loads(line.split("sync finished ", 1)[1])["run_id"] for line in lines]
    assert sorted(finished) == [first.id, second.id]
    assert _lock_is_free(runtime)


def test_shared_rate_limit_holds_across_processes_and_429_pauses_all(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    limit = 8
    _people(shop, 240)
    # A destination name of its own: its bucket in Redis is shared by no other test run.
    name = f"paced_{os.getpid()}_{time.monotonic_ns()}"
    config = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Paced", "a", destinations=[name])],
        destinations={name: _ortto(fake, rate_limit=f"{limit}/s")},
    )
    apply_file(runtime, config)
    # The first request is told to wait a second.
    fake.add_fault("rate_limit", count=1, seconds=1.0, style="header")

    with _worker(state_url, tmp_path, concurrency=3, chunk_size=10) as worker:
        worker.send("audience_sync.sync_pair", _pair_ids(runtime, "paced")[0], {}).get(timeout=30)
        (run,) = _wait_runs(runtime, 1, timeout=60)
        chunk_processes = worker.processes_that_ran("audience_sync.deliver_chunk")

    arrivals = [a for a in fake.arrivals("ortto") if a.path == "/v1/identify"]
    assert (run.status, run.sent) == ("succeeded", 240)
    assert len(chunk_processes) == 3
    assert len(arrivals) == 24 + 1  # one request per chunk, and the one answered 429
    times = sorted(a.at for a in arrivals)
    # Requests leave 1/(0.98 * limit) apart; a window a little under a second leaves room
    # for network jitter and still holds at most `limit` of them. Three processes each with
    # a bucket of their own would send three times as many.
    assert max_requests_in_window(times, 0.95) <= limit
    # After the 429, only requests the other two processes had already reserved a slot
    # for arrive within the pause; every process then waited.
    refused_at = next(a.at for a in arrivals if a.status == 429)
    after = [t for t in times if t > refused_at]
    assert len([t for t in after if t < refused_at + 0.9]) <= 2


# ----------------------------------------------------------------- failures


def test_destination_down_fails_and_retries_on_its_own_without_blocking_others(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    _people(shop, 20)
    config = write_config(
        tmp_path,
        source_url=shop.url,
        # Pairs are queued in destination name order: the broken one goes first.
        audiences=[audience("Both", "a", destinations=["flaky", "steady"])],
        destinations={
            "flaky": _ortto(fake),
            "steady": {"type": "file", "path": str(tmp_path / "identify.ndjson")},
        },
    )
    apply_file(runtime, config)
    fake.stop()  # connection refused until it starts again

    # One pool process: had the retry waited inside its task, the other pair would wait too.
    with _worker(
        state_url,
        tmp_path,
        concurrency=1,
        max_attempts=2,
        backoff_base_seconds=0.05,
        backoff_max_seconds=0.1,
        task_retries=2,
        task_retry_delay_seconds=2,
    ) as worker:
        worker.send("audience_sync.sync_audience", "both").get(timeout=30)
        _wait_runs(runtime, 2)
        fake.start()  # back before the retry
        runs = _wait_runs(runtime, 3)

    names = _destination_names(runtime)
    failed, steady, retried = runs
    assert [(names[r.destination_id], r.status) for r in runs] == [
        ("flaky", "failed"),
        ("steady", "succeeded"),
        ("flaky", "succeeded"),
    ]
    assert failed.error is not None and "flaky" in failed.error
    # The one worker process went on to the working destination at once: the broken one's
    # retry waits (2 s) in the queue, not in the process.
    assert failed.finished_at is not None and steady.finished_at is not None
    assert (steady.started_at - failed.finished_at).total_seconds() < 1.0
    assert steady.finished_at < retried.started_at
    assert (retried.trigger, retried.sent) == ("manual", 20)
    assert sorted(_ids_received(fake)) == [f"u{i:05d}" for i in range(20)]
    assert _lock_is_free(runtime)


def test_failing_chunks_fail_the_run_once_and_free_the_pair(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    _people(shop, 300)
    apply_file(runtime, _ortto_config(tmp_path, shop, fake, rate_limit="100/s"))
    pair = _pair_ids(runtime, "big")[0]
    fake.add_fault("server_error", count=10_000, status=503)

    with _worker(
        state_url,
        tmp_path,
        concurrency=3,
        chunk_size=100,
        max_attempts=2,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.02,
        task_retries=1,
        task_retry_delay_seconds=0.2,
    ) as worker:
        worker.send("audience_sync.sync_pair", pair, {}).get(timeout=30)
        (failed,) = _wait_runs(runtime, 1)
        refused = [a for a in fake.arrivals("ortto") if a.status == 503]
        chunk_retries = re.findall(r"deliver_chunk\[[^\]]+\] retry:", worker.log())
        assert _lock_is_free(runtime)
        # The destination recovers: the next run delivers everything.
        fake.reset()
        worker.send("audience_sync.sync_pair", pair, {}).get(timeout=30)
        recovered = _wait_runs(runtime, 2)[-1]
        lines = worker.finished_lines()

    assert failed.status == "failed"
    assert failed.error is not None and "503" in failed.error
    assert (failed.sent, failed.failed, failed.entered) == (0, 0, 300)
    # Three chunks of 100 (and an empty last one): each chunk task tried twice, each time
    # with two attempts at its request.
    assert len(chunk_retries) == 3
    assert len(refused) == 3 * 2 * 2
    assert (recovered.status, recovered.sent) == ("succeeded", 300)
    assert sorted(_ids_received(fake)) == [f"u{i:05d}" for i in range(300)]
    assert len(lines) == 2  # each run closed once


def test_lock_of_a_killed_worker_expires(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    ttl = 5
    _people(shop, 20)
    slow = _slow_audience("K", seconds=3)
    apply_file(
        runtime, write_config(tmp_path, source_url=shop.url, audiences=[slow]), check_queries=False
    )
    pair = _pair_ids(runtime, "k")[0]

    with _worker(state_url, tmp_path, concurrency=1, lock_ttl_seconds=ttl) as worker:
        worker.send("audience_sync.sync_pair", pair, {})
        wait_for(lambda: not _lock_is_free(runtime), timeout=10, what="the run to take the lock")
        worker.kill()  # mid-run, the way a host dies: no cleanup at all
        killed_at = time.monotonic()

    (dead,) = _runs(runtime, "k")
    assert dead.status == "running"
    # Meanwhile the pair stays held: another trigger is skipped, not run alongside.
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "skipped"

    # Nobody extends the dead run's lock: after its TTL the pair is free for the next run.
    wait_for(
        lambda: not runtime.service.status()[0].is_running, timeout=ttl + 5, what="lock expiry"
    )
    assert time.monotonic() - killed_at <= ttl + 1
    summary = runtime.service.sync_pair(pair, SyncRequest())
    assert summary.status == "succeeded" and summary.sent == 20
    dead = _runs(runtime, "k")[0]
    assert dead.status == "failed" and "interrupted" in (dead.error or "")


def test_a_crashing_chunk_fails_the_run_through_the_chord_error_callback(
    tmp_path: Path, state_url: str, shop: ShopSource, runtime: Runtime
) -> None:
    _people(shop, 30)
    apply_file(runtime, write_config(tmp_path, source_url=shop.url, audiences=[audience("C", "a")]))
    pair = _pair_ids(runtime, "c")[0]
    # Started here (lock, snapshot); the chunks then meet a destination that does not exist,
    # which no chunk task handles: the task raises.
    prepared = runtime.service.start_run(pair, SyncRequest())
    assert isinstance(prepared, PreparedRun)
    broken = dataclasses.replace(prepared, destination_id=prepared.destination_id + 1000)
    chunks = [ChunkRange(None, "u00014"), ChunkRange("u00014", None)]

    with _worker(state_url, tmp_path, concurrency=2) as worker:
        fan_out_chord(worker.app, FanOut(broken, chunks)).apply_async()
        (run,) = _wait_runs(runtime, 1)
        lines = worker.finished_lines()

    assert (run.status, run.error, run.sent) == ("failed", ABANDONED, 0)
    assert _lock_is_free(runtime)
    assert len(lines) == 1


@pytest.mark.parametrize("revision", [None, "9999_from_the_future"])
def test_a_worker_refuses_an_unusable_state_database_at_start(
    tmp_path: Path, revision: str | None
) -> None:
    # Checked once, before the pool starts: one ERROR line and a failed exit, not a worker
    # that takes tasks only to fail each of them on the schema.
    with postgres_database(migrated=revision is not None) as url:
        if revision is not None:
            engine = make_engine(url)
            with engine.begin() as connection:
                connection.execute(
                    text("update alembic_version set version_num = :v"), {"v": revision}
                )
            engine.dispose()
        worker = CeleryWorker(database_url=url, log_path=tmp_path / "worker.log")
        try:
            with pytest.raises(AssertionError, match="the worker exited at start"):
                worker.start()
            assert worker.process is not None
            assert worker.process.wait(timeout=10) != 0
        finally:
            worker.stop()
    errors = [line for line in worker.log().splitlines() if "ERROR" in line]
    expected = "is not initialised" if revision is None else "newer than this version"
    assert len(errors) == 1, worker.log()
    assert "the worker does not start: state database at " in errors[0]
    assert expected in errors[0]
    assert "Traceback" not in worker.log()
