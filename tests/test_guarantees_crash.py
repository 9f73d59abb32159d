"""Guarantee 1: a crash at any point loses nothing.

A real `audience-sync sync` process is killed with SIGKILL at each named step of a run
(`AUDIENCE_SYNC_CRASH_AT`), or at a random moment of its delivery; the source then changes
again, and the next run must close the dead run as failed ("interrupted") and leave the
fake Ortto endpoint exactly where the source says. Re-sent duplicates are bounded by the
page in flight at the kill, plus the users whose change the source undid before the next
run (the dead run may have told them, so they get their value again).

The next run happens in this process, on a clock moved past the dead run's lock (the one
test that waits for the lock in real time runs every process for real).
"""

import random
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Snapshot, SyncRun
from worker.context import utcnow
from worker.destinations.ortto import OrttoDestination
from worker.domain import PreparedRun, SyncRequest
from worker.repositories.runs import INTERRUPTED
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import (
    apply_file,
    audience,
    destination_state,
    read_calls,
    write_config,
)
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    cli_env,
    kill_when,
    ortto_destination,
    redundant_sends,
    run_cli,
    start_cli,
    wrong_values,
)

KEY = "crash_test"
LOCK_TTL = 5
PAGE = OrttoDestination.max_batch_items  # calls per page the service hands to the client


def _user(i: int) -> str:
    return f"u{i:05d}"


def _configure(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, rate: str
) -> None:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Crash Test", "a", destinations=["ortto"])],
        destinations={"ortto": ortto_destination(fake, rate_limit=rate)},
    )
    apply_file(runtime, path)


def _env(runtime: Runtime, fake: FakeDestinations, **settings: str) -> dict[str, str]:
    env = cli_env(
        runtime.settings.database_url,
        lock_ttl_seconds=str(LOCK_TTL),
        source_fetch_size="200",
        backoff_base_seconds="0.01",
        **settings,
    )
    env[ORTTO_KEY_VARIABLE] = fake.ortto_key
    return env


def _after_lock_expiry(runtime: Runtime) -> SyncService:
    """The service of a later process: its clock is past the dead run's lock."""

    def later() -> datetime:
        return utcnow() + timedelta(seconds=LOCK_TTL + 1)

    return SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        clock=later,
    )


def _runs(runtime: Runtime) -> list[tuple[int, str, str | None]]:
    with runtime.sessions() as session:
        return [
            (run.id, run.status, run.error)
            for run in session.scalars(select(SyncRun).order_by(SyncRun.id))
        ]


def _snapshots(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(Snapshot)) or 0


def _rerun_and_check(
    runtime: Runtime,
    fake: FakeDestinations,
    shop: ShopSource,
    *,
    dead_run: int,
    max_redundant: int,
) -> None:
    service = _after_lock_expiry(runtime)
    [pair] = service.select_pairs(audience_keys=[KEY])
    summary = service.sync_pair(pair, SyncRequest())
    assert summary.status == "succeeded", summary
    runs = {run_id: (status, error) for run_id, status, error in _runs(runtime)}
    assert runs[dead_run] == ("failed", INTERRUPTED)
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    assert redundant_sends(fake.items("ortto"), KEY) <= max_redundant


# (step, pages the killed process may have sent without recording them)
CRASH_STEPS = [
    ("after_lock", 0),
    ("reading_source@2", 0),
    ("writing_snapshot@3", 0),
    ("loading_staging", 0),
    ("writing_change_log", 0),
    ("before_delivery", 0),
    ("page_sent@1", 1),
    ("page_sent@2", 1),
    ("page_recorded@1", 0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("crash_at", "pages_in_flight"), CRASH_STEPS)
def test_kill_at_each_step_then_rerun_converges(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    crash_at: str,
    pages_in_flight: int,
) -> None:
    shop.add((_user(i), f"{_user(i)}@example.com", int(i < 1000), 0, 0) for i in range(1500))
    _configure(tmp_path, shop, runtime, fake, "1000/s")
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    assert fake.state("ortto")[KEY] == dict.fromkeys(shop.members("a"), True)

    # 300 leave and 400 join: one page of exits, then one page of entries.
    shop.set_flag("a", [_user(i) for i in range(300)], 0)
    shop.set_flag("a", [_user(i) for i in range(1000, 1400)], 1)
    snapshots, received = _snapshots(runtime), len(fake.items("ortto"))

    killed = run_cli("sync", KEY, env=_env(runtime, fake, crash_at=crash_at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead_run, status, _ = _runs(runtime)[-1]
    assert status == "running"
    step = crash_at.partition("@")[0]
    if step in ("after_lock", "reading_source", "writing_snapshot", "loading_staging"):
        assert _snapshots(runtime) == snapshots  # the half-read source left nothing
    if not step.startswith("page_"):
        assert len(fake.items("ortto")) == received  # nothing was sent

    # The source moves on before the next run: some of the killed run's changes undo.
    reverted = [_user(i) for i in (*range(50), *range(1000, 1050))]
    shop.set_flag("a", reverted[:50], 1)
    shop.set_flag("a", reverted[50:], 0)
    # Re-sent: the page in flight, and users reverted since (the dead run may have told
    # them, so they get their value again).
    _rerun_and_check(
        runtime,
        fake,
        shop,
        dead_run=dead_run,
        max_redundant=pages_in_flight * PAGE + len(reverted),
    )


@pytest.mark.slow
def test_random_kill_during_delivery_then_rerun_converges(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, backend: str
) -> None:
    rng = random.Random(f"random-kill-{backend}")
    members = 6000
    shop.add((_user(i), None, int(i < members), 0, 0) for i in range(members + 500))
    # Twelve pages at 30 requests a second: delivery takes about 0.4 s.
    _configure(tmp_path, shop, runtime, fake, "30/s")
    # Anywhere in the first part of delivery: sending, waiting, or recording a page.
    delay = rng.uniform(0.0, 0.3)
    returncode = kill_when(
        start_cli("sync", KEY, env=_env(runtime, fake)),
        lambda: len(fake.arrivals("ortto")) > 0,
        timeout=30,
        delay=delay,
    )
    where = f"killed {delay:.3f}s after delivery began"
    assert returncode == -signal.SIGKILL, f"the run finished first ({where})"
    sent = len(fake.items("ortto"))
    assert 0 < sent < members, f"{where}, {sent} contacts in"
    dead_run = _runs(runtime)[-1][0]

    # Every tenth user leaves (some of them in the page that was in flight), 100 join.
    reverted = [_user(i) for i in range(0, members, 10)]
    shop.set_flag("a", reverted, 0)
    shop.set_flag("a", [_user(i) for i in range(members, members + 100)], 1)
    _rerun_and_check(runtime, fake, shop, dead_run=dead_run, max_redundant=PAGE)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("backend", ["postgresql"])  # it waits for the TTL: one backend
def test_a_killed_runs_lock_holds_until_it_expires(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    """No clock tricks: a run started while the dead run's lock is live is skipped and
    sends nothing; once the lock expired, the next process takes over and finishes."""
    shop.add((_user(i), None, int(i < 700), 0, 0) for i in range(800))
    _configure(tmp_path, shop, runtime, fake, "1000/s")
    env = _env(runtime, fake)

    killed = run_cli("sync", KEY, env={**env, "AUDIENCE_SYNC_CRASH_AT": "page_sent@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    dead_run = _runs(runtime)[-1][0]
    received = len(fake.items("ortto"))
    assert received == PAGE

    early = run_cli("sync", KEY, env=env)
    assert early.returncode == 3, early.stderr  # skipped: its own exit status
    assert _runs(runtime)[-1][1] == "skipped"
    assert len(fake.items("ortto")) == received

    time.sleep(LOCK_TTL + 0.5)
    later = run_cli("sync", KEY, env=env)
    assert later.returncode == 0, later.stdout + later.stderr
    runs = {run_id: (status, error) for run_id, status, error in _runs(runtime)}
    assert runs[dead_run] == ("failed", INTERRUPTED)
    assert runs[max(runs)][0] == "succeeded"
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}
    assert redundant_sends(fake.items("ortto"), KEY) <= PAGE


def test_a_run_that_lost_its_lock_sends_nothing_more(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    """A run stalled past its lock's expiry (taken for dead and closed by the next run)
    must not wake up and send what it computed back then: the source may have moved on."""
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0)])
    apply_file(
        runtime,
        write_config(tmp_path, source_url=shop.url, audiences=[audience("Crash Test", "a")]),
    )
    [pair] = runtime.service.select_pairs()
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    out = tmp_path / "identify.ndjson"

    shop.set_flag("a", ["u1"], 0)
    stalled = runtime.service.start_run(pair, SyncRequest())
    assert isinstance(stalled, PreparedRun) and stalled.to_exit == 1
    shop.set_flag("a", ["u1"], 1)  # back before anyone told the destination
    later = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        clock=lambda: utcnow() + timedelta(seconds=runtime.settings.lock_ttl_seconds + 1),
    )
    assert later.sync_pair(pair, SyncRequest()).status == "succeeded"
    seen = len(read_calls(out))

    woken = runtime.service.deliver_run(stalled)
    assert woken.status == "failed" and woken.error == INTERRUPTED
    assert read_calls(out)[seen:] == []
    assert destination_state(read_calls(out), KEY) == {"u1": True, "u2": True}
