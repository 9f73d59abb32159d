"""Running it unattended: a real `audience-sync sync` process stopped by SIGINT or SIGTERM,
or by `runs cancel`, ends `cancelled` at a page boundary with its lock free; a dead run's
lock is freed by `runs cancel --force`; a `--full` killed midway is completed by the next
scheduled run; `status` tells live, dead and remote runs apart.

Delivery is slowed by the destination's rate limit (a page of 500 contacts every quarter
or half second), so that a signal or a cancel lands while pages are still to be sent.
"""

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from models import AudienceDestination, SyncRun
from worker.context import utcnow
from worker.destinations.ortto import OrttoDestination
from worker.domain import RunStatus, SyncRequest, Trigger
from worker.locking import STALE_HERE, LockHolder, run_state, where_this_runs
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    cli_env,
    ortto_destination,
    run_cli,
    start_cli,
    wrong_values,
)

KEY = "ops_test"
LOCK_TTL = 30  # long: nothing in these tests may wait for a lock to expire
PAGE = OrttoDestination.max_batch_items


def _user(i: int) -> str:
    return f"u{i:05d}"


def _configure(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, *, rate: str
) -> int:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Ops Test", "a", destinations=["ortto"])],
        destinations={"ortto": ortto_destination(fake, rate_limit=rate)},
    )
    apply_file(runtime, path)
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    return pair


def _env(runtime: Runtime, fake: FakeDestinations, **settings: str) -> dict[str, str]:
    env = cli_env(
        runtime.settings.database_url,
        lock_ttl_seconds=str(LOCK_TTL),
        backoff_base_seconds="0.01",
        **settings,
    )
    env[ORTTO_KEY_VARIABLE] = fake.ortto_key
    return env


def _last_run(runtime: Runtime) -> SyncRun:
    with runtime.sessions() as session:
        run = session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(1)).one()
        session.expunge(run)
        return run


def _pair(runtime: Runtime) -> AudienceDestination:
    with runtime.sessions() as session:
        pair = session.scalars(select(AudienceDestination)).one()
        session.expunge(pair)
        return pair


def _wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _finish(process: "subprocess.Popen[str]") -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stdout, stderr


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_sync_at_a_page_boundary(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    signum: int,
    code: int,
) -> None:
    members = 10 * PAGE
    shop.add((_user(i), None, 1, 0, 0) for i in range(members))
    _configure(tmp_path, shop, runtime, fake, rate="4/s")
    env = _env(runtime, fake)
    process = start_cli("sync", KEY, env=env)
    _wait_until(lambda: len(fake.arrivals("ortto")) >= 2, timeout=60, what="delivery")
    process.send_signal(signum)
    returncode, stdout, stderr = _finish(process)
    sent = len(fake.items("ortto"))

    assert returncode == code, stderr
    [line] = _lines(stderr)
    assert line.startswith("cancelled run ") and signal.Signals(signum).name in line, line
    assert stdout == ""
    run = _last_run(runtime)
    assert run.status == RunStatus.CANCELLED and run.finished_at is not None
    # Stopped at a page boundary: every page sent was recorded, none is in doubt.
    assert 0 < sent < members and sent % PAGE == 0
    assert run.sent == sent
    assert _pair(runtime).lock_owner is None

    # Right away (no lock to wait for): the rerun runs and the destination converges.
    rerun = run_cli("sync", KEY, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert _last_run(runtime).status == RunStatus.SUCCEEDED
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    assert len(fake.items("ortto")) == members  # nothing sent twice


@pytest.mark.slow
def test_runs_cancel_stops_a_live_run_within_one_page(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    members = 40 * PAGE  # twenty seconds of delivery: time for two commands to start
    shop.add((_user(i), None, 1, 0, 0) for i in range(members))
    _configure(tmp_path, shop, runtime, fake, rate="2/s")
    env = _env(runtime, fake)
    process = start_cli("sync", KEY, env=env)
    _wait_until(lambda: len(fake.arrivals("ortto")) >= 1, timeout=60, what="delivery")
    run_id = _last_run(runtime).id

    status = json.loads(run_cli("status", "--json", env=env).stdout)
    assert status[0]["run_state"] == "running"
    asked = run_cli("runs", "cancel", str(run_id), env=env)
    assert asked.returncode == 0, asked.stderr
    assert f"asked run {run_id} to stop" in asked.stdout
    pages_when_asked = len(fake.arrivals("ortto"))
    returncode, stdout, stderr = _finish(process)

    assert returncode == 4, stderr  # cancelled with `runs cancel`
    assert "cancelled with `audience-sync runs cancel`" in stdout
    # The page in flight when the flag was set is the last one sent.
    assert len(fake.arrivals("ortto")) <= pages_when_asked + 1
    run = _last_run(runtime)
    assert run.status == RunStatus.CANCELLED and "runs cancel" in (run.error or "")
    assert _pair(runtime).lock_owner is None
    # A run that is no longer running cannot be cancelled: one line, exit 2.
    again = run_cli("runs", "cancel", str(run_id), env=env)
    assert again.returncode == 2 and "is not running (it is cancelled)" in again.stderr
    assert run_cli("runs", "cancel", "999999", env=env).returncode == 2


@pytest.mark.slow
def test_runs_cancel_force_frees_a_dead_runs_lock(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 3 * PAGE), 0, 0) for i in range(4 * PAGE))
    _configure(tmp_path, shop, runtime, fake, rate="1000/s")
    env = _env(runtime, fake)
    killed = run_cli("sync", KEY, env={**env, "AUDIENCE_SYNC_CRASH_AT": "page_sent@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead = _last_run(runtime)
    assert dead.status == RunStatus.RUNNING
    shown = json.loads(run_cli("runs", "show", str(dead.id), "--json", env=env).stdout)
    where = (shown["host"], shown["pid"], shown["task_id"])
    assert where == (socket.gethostname(), dead.pid, None) and dead.pid != os.getpid()

    [row] = json.loads(run_cli("status", "--json", env=env).stdout)
    assert row["run_state"] == STALE_HERE
    skipped = run_cli("sync", KEY, env=env)
    assert skipped.returncode == 3, skipped.stderr  # skipped: its own exit status
    assert _last_run(runtime).status == RunStatus.SKIPPED

    # Without --force, a dead process cannot be asked anything: one line says what to do.
    asked = run_cli("runs", "cancel", str(dead.id), env=env)
    assert asked.returncode == 2
    assert _lines(asked.stderr) == [
        f"error: run {dead.id}'s process (pid {dead.pid}) is gone: "
        f"`audience-sync runs cancel {dead.id} --force` closes it"
    ]
    forced = run_cli("runs", "cancel", str(dead.id), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert _pair(runtime).lock_owner is None
    with runtime.sessions() as session:
        closed = session.get(SyncRun, dead.id)
        assert closed is not None and closed.status == RunStatus.CANCELLED
    assert json.loads(run_cli("status", "--json", env=env).stdout)[0]["run_state"] is None

    # No waiting for the lock: the next run goes, and the page in flight was settled as
    # in doubt (re-sent), so the destination ends right.
    rerun = run_cli("sync", KEY, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}


def test_runs_cancel_force_refuses_a_live_run(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add([("u1", None, 1, 0, 0)])
    pair = _configure(tmp_path, shop, runtime, fake, rate="1000/s")
    runtime.service.start_run(pair, SyncRequest())  # started by this (live) process
    run_id = _last_run(runtime).id
    refused = run_cli("runs", "cancel", str(run_id), "--force", env=_env(runtime, fake))
    assert refused.returncode == 2
    assert _lines(refused.stderr) == [
        f"error: run {run_id} is alive (pid {_last_run(runtime).pid} on this host): "
        f"`audience-sync runs cancel {run_id}` stops it at its next page"
    ]
    assert _pair(runtime).lock_owner == f"run:{run_id}"


def _set_by_hand(fake: FakeDestinations, users: list[str], value: bool) -> None:
    """Someone changes the trait at the destination, outside audience-sync."""
    calls = [{"type": "identify", "user_id": user, "traits": {KEY: value}} for user in users]
    answer = httpx.post(
        f"{fake.url}/v1/identify",
        json=calls,
        headers={"Authorization": f"Bearer {fake.ortto_key}"},
        timeout=10,
    )
    assert answer.status_code == 200 and "errors" not in answer.json(), answer.text


@pytest.mark.slow
def test_a_killed_full_sync_is_completed_by_the_next_scheduled_run(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    members = 3 * PAGE
    shop.add((_user(i), None, int(i < members), 0, 0) for i in range(members + 100))
    pair = _configure(tmp_path, shop, runtime, fake, rate="1000/s")
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    # Changed by hand at the destination: an incremental run would never look at them.
    by_hand = [_user(i) for i in (*range(100), *range(2 * PAGE, 2 * PAGE + 100))]
    _set_by_hand(fake, by_hand, False)
    assert set(wrong_values(fake.state("ortto")[KEY], shop.members("a"))) == set(by_hand)

    env = _env(runtime, fake, crash_at="page_sent@1")
    killed = run_cli("sync", KEY, "--full", env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _pair(runtime).is_full_sync_owed
    [row] = json.loads(run_cli("status", "--json", env=_env(runtime, fake)).stdout)
    assert row["is_full_sync_owed"] is True
    assert "full sync owed" in run_cli("status", env=_env(runtime, fake)).stdout

    # The next scheduled run (a later process, past the dead run's lock) is full.
    def later() -> datetime:
        return utcnow() + timedelta(seconds=LOCK_TTL + 1)

    scheduler = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        clock=later,
    )
    summary = scheduler.sync_pair(pair, SyncRequest(trigger=Trigger.SCHEDULE))
    assert (summary.status, summary.mode) == ("succeeded", "full")
    assert _last_run(runtime).trigger == Trigger.FULL_OWED
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    assert not _pair(runtime).is_full_sync_owed

    # Owed no more: the run after is incremental again.
    after = scheduler.sync_pair(pair, SyncRequest(trigger=Trigger.SCHEDULE))
    assert (after.mode, _last_run(runtime).trigger) == ("incremental", "schedule")


NOW = datetime(2026, 11, 28, 12, 0, 0)
TTL = timedelta(seconds=300)


@pytest.mark.parametrize(
    ("holder", "alive", "state"),
    [
        (None, True, None),
        (LockHolder(1, "here", 10, NOW + TTL), True, "running"),
        (LockHolder(1, "here", 10, NOW + TTL), False, STALE_HERE),
        (LockHolder(1, "here", 10, NOW - timedelta(seconds=1)), False, STALE_HERE),
        (
            LockHolder(1, "there", 10, NOW + TTL - timedelta(seconds=12)),
            True,
            "running elsewhere (there, pid 10, heartbeat 12 s ago)",
        ),
        (
            LockHolder(1, "there", 10, NOW - timedelta(seconds=5)),
            True,
            "stale (lock expired; there, pid 10, heartbeat 305 s ago)",
        ),
        (LockHolder(None, None, None, NOW + TTL), True, "running"),
    ],
)
def test_run_state(holder: LockHolder | None, alive: bool, state: str | None) -> None:
    assert run_state(holder, now=NOW, ttl=TTL, this_host="here", is_alive=lambda _: alive) == (
        state
    )


def test_a_failed_full_sync_makes_the_next_manual_run_full(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, 1, 0, 0) for i in range(10))
    pair = _configure(tmp_path, shop, runtime, fake, rate="1000/s")
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    fake.add_fault("server_error", count=100)
    failed = runtime.service.sync_pair(pair, SyncRequest(is_full=True))
    assert (failed.status, failed.mode) == ("failed", "full")
    assert _pair(runtime).is_full_sync_owed
    fake.reset()

    dry = runtime.service.sync_pair(pair, SyncRequest(is_dry_run=True))
    assert dry.mode == "dry_run" and _pair(runtime).is_full_sync_owed  # left as it is
    owed = runtime.service.sync_pair(pair, SyncRequest())
    assert (owed.status, owed.mode, owed.sent) == ("succeeded", "full", 10)
    assert _last_run(runtime).trigger == Trigger.FULL_OWED
    assert not _pair(runtime).is_full_sync_owed


@pytest.mark.slow
def test_a_second_sigint_exits_at_once(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, 1, 0, 0) for i in range(10 * PAGE))
    _configure(tmp_path, shop, runtime, fake, rate="2/s")
    process = start_cli("sync", KEY, env=_env(runtime, fake))
    _wait_until(lambda: len(fake.arrivals("ortto")) >= 2, timeout=60, what="delivery")
    # A page goes every half second: the process now waits to send the next one, and the
    # first signal makes it finish that page before stopping; the second cuts it short.
    time.sleep(0.15)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    returncode, _, stderr = _finish(process)

    assert returncode == 130
    assert _lines(stderr) == ["interrupted again: exiting now; the run's lock expires by itself"]
    # Nothing was recorded on the way out: the run looks like a crash, its lock held.
    run = _last_run(runtime)
    assert run.status == RunStatus.RUNNING
    assert _pair(runtime).lock_owner == f"run:{run.id}"


def test_a_run_in_a_celery_task_records_the_task_id() -> None:
    from celery import Celery

    app = Celery("where", set_as_current=False)

    @app.task(name="where")
    def where() -> tuple[str, int, str | None]:
        return where_this_runs()

    outcome = where.apply(task_id="task-42")
    assert outcome.get() == (socket.gethostname(), os.getpid(), "task-42")
    assert where_this_runs() == (socket.gethostname(), os.getpid(), None)
