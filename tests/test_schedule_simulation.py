"""Schedules over a simulated day: beat's one-minute tick drives the dispatcher (the
service's `due_pairs`, then the `is_due` re-check a queued `sync_pair` makes) with a fake
clock, and every start of every pair is checked. Dry runs, skipped runs and blocked manual
runs happen in between and must not move any schedule."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.domain import RunMode, RunStatus, SyncRequest, Trigger
from worker.repositories import audiences as audience_repo
from worker.repositories import runs as run_repo
from worker.runtime import Runtime
from worker.service import SyncService
from worker.settings import Settings
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, write_config

# Monday 2026-11-30; beat's ticks come 7 s past each minute, with up to 3 s of jitter.
MIDNIGHT = datetime(2026, 11, 30, tzinfo=UTC)
TICKS = 24 * 60
SCHEDULES = {
    "every_minute": "every 1m",
    "every_two_hours": "every 2h",
    "every_day": "every 1d",
    "quarter_hours": "*/15 * * * *",
    "weekday_mornings": "30 9 * * 1-5",
}
# The ticks at which each pair must start (a pair that never ran starts at the first tick).
EXPECTED_TICKS = {
    "every_minute": list(range(TICKS)),
    "every_two_hours": list(range(0, TICKS, 120)),
    "every_day": [0],
    "quarter_hours": list(range(0, TICKS, 15)),
    "weekday_mornings": [0, 9 * 60 + 30],
}


def tick_time(index: int) -> datetime:
    return MIDNIGHT + timedelta(minutes=index, seconds=7 + index % 4)


def start_delay(index: int) -> timedelta:
    """How long after its tick a queued sync starts (a worker picking it up)."""
    return timedelta(seconds=1 + index % 3)


class Clock:
    def __init__(self) -> None:
        self.now = MIDNIGHT

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def pairs(tmp_path: Path, shop: ShopSource, runtime: Runtime) -> dict[str, int]:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[
            audience(key, "a", key=key, schedule=schedule) for key, schedule in SCHEDULES.items()
        ],
    )
    apply_file(runtime, path, check_queries=False)
    ids = runtime.service.select_pairs()
    with runtime.sessions() as session:
        return {
            pair.audience.key: pair.id
            for pair in (audience_repo.pair_by_id(session, i) for i in ids)
            if pair is not None
        }


def _record(
    runtime: Runtime,
    pair_id: int,
    when: datetime,
    *,
    status: RunStatus = RunStatus.SUCCEEDED,
    mode: RunMode = RunMode.INCREMENTAL,
    trigger: Trigger = Trigger.SCHEDULE,
) -> None:
    """A run of the pair that started at `when` and ended as `status` (what a sync leaves
    in sync_runs; the schedule reads nothing else)."""
    with runtime.sessions.begin() as session:
        pair = audience_repo.pair_by_id(session, pair_id)
        assert pair is not None
        run_repo.create_run(
            session,
            audience_id=pair.audience_id,
            destination_id=pair.destination_id,
            mode=mode,
            trigger=trigger,
            now=when,
            status=status,
        )


def _noise(pairs: dict[str, int]) -> dict[int, list[tuple[int, RunStatus, RunMode, Trigger]]]:
    """Runs that must not move a schedule, by the tick after which they happen."""
    manual = Trigger.MANUAL
    noise: dict[int, list[tuple[int, RunStatus, RunMode, Trigger]]] = {}
    for tick in (30, 200, 700, 1000):
        noise[tick] = [
            (pair_id, RunStatus.SUCCEEDED, RunMode.DRY_RUN, manual) for pair_id in pairs.values()
        ]
    for tick in (45, 300, 1100):
        noise.setdefault(tick, []).extend(
            (pair_id, RunStatus.BLOCKED, RunMode.INCREMENTAL, manual) for pair_id in pairs.values()
        )
    for tick in (59, 601, 1300):
        noise.setdefault(tick, []).extend(
            (pair_id, RunStatus.SKIPPED, RunMode.INCREMENTAL, manual) for pair_id in pairs.values()
        )
    return noise


def _simulate(
    runtime: Runtime, settings: Settings, pairs: dict[str, int]
) -> Iterator[tuple[int, int, datetime]]:
    """(tick, pair, start) for each scheduled start over the day."""
    clock = Clock()
    service = SyncService(
        session_factory=runtime.sessions,
        settings=settings,
        destinations=runtime.destinations,
        clock=clock,
    )
    noise = _noise(pairs)
    # The every-two-hours pair's 02:00 run is blocked: it took its slot all the same.
    blocked_slot = (pairs["every_two_hours"], 120)
    for index in range(TICKS):
        clock.now = tick_time(index)
        queued = service.due_pairs()
        clock.now += start_delay(index)
        for pair_id in queued:
            if service.is_due(pair_id):  # the check a queued `sync_pair` makes first
                status = (
                    RunStatus.BLOCKED if (pair_id, index) == blocked_slot else RunStatus.SUCCEEDED
                )
                _record(runtime, pair_id, clock.now, status=status)
                yield index, pair_id, clock.now
        for pair_id, status, mode, trigger in noise.get(index, []):
            _record(
                runtime,
                pair_id,
                clock.now + timedelta(seconds=20),
                status=status,
                mode=mode,
                trigger=trigger,
            )


def test_a_simulated_day_starts_every_pair_exactly_on_schedule(
    runtime: Runtime, settings: Settings, pairs: dict[str, int]
) -> None:
    keys = {pair_id: key for key, pair_id in pairs.items()}
    starts: dict[str, list[datetime]] = {key: [] for key in pairs}
    for _, pair_id, started in _simulate(runtime, settings, pairs):
        starts[keys[pair_id]].append(started)
    for key, ticks in EXPECTED_TICKS.items():
        expected = [tick_time(i) + start_delay(i) for i in ticks]
        assert starts[key] == expected, key
    assert len(starts["every_minute"]) == 1440


def test_the_dispatcher_queues_a_due_pair_once_per_tick(
    runtime: Runtime, settings: Settings, pairs: dict[str, int]
) -> None:
    """A request queued by the dispatcher and still waiting when the next tick comes is not
    started twice: the second copy finds the pair no longer due."""
    clock = Clock()
    service = SyncService(
        session_factory=runtime.sessions,
        settings=settings,
        destinations=runtime.destinations,
        clock=clock,
    )
    pair_id = pairs["every_two_hours"]
    clock.now = tick_time(0)
    assert pair_id in service.due_pairs()
    summary = service.sync_pair(pair_id, SyncRequest(trigger=Trigger.SCHEDULE))
    assert summary.status == RunStatus.SUCCEEDED
    clock.now = tick_time(1)
    assert pair_id not in service.due_pairs() and not service.is_due(pair_id)


@pytest.mark.parametrize(
    ("status", "mode", "trigger", "moves"),
    [
        (RunStatus.SUCCEEDED, RunMode.INCREMENTAL, Trigger.SCHEDULE, True),
        (RunStatus.SUCCEEDED, RunMode.INCREMENTAL, Trigger.MANUAL, True),
        (RunStatus.SUCCEEDED, RunMode.FULL, Trigger.MANUAL, True),
        (RunStatus.PARTIAL, RunMode.INCREMENTAL, Trigger.SCHEDULE, True),
        (RunStatus.FAILED, RunMode.INCREMENTAL, Trigger.SCHEDULE, True),
        (RunStatus.RUNNING, RunMode.INCREMENTAL, Trigger.SCHEDULE, True),
        (RunStatus.BLOCKED, RunMode.INCREMENTAL, Trigger.SCHEDULE, True),
        (RunStatus.BLOCKED, RunMode.INCREMENTAL, Trigger.MANUAL, False),
        (RunStatus.SKIPPED, RunMode.INCREMENTAL, Trigger.SCHEDULE, False),
        (RunStatus.SKIPPED, RunMode.INCREMENTAL, Trigger.MANUAL, False),
        (RunStatus.SUCCEEDED, RunMode.DRY_RUN, Trigger.MANUAL, False),
        (RunStatus.BLOCKED, RunMode.DRY_RUN, Trigger.MANUAL, False),
    ],
)
def test_which_runs_move_the_schedule(
    runtime: Runtime,
    pairs: dict[str, int],
    status: RunStatus,
    mode: RunMode,
    trigger: Trigger,
    moves: bool,
) -> None:
    pair_id = pairs["every_two_hours"]
    first, later = MIDNIGHT, MIDNIGHT + timedelta(minutes=30)
    _record(runtime, pair_id, first)
    _record(runtime, pair_id, later, status=status, mode=mode, trigger=trigger)
    with runtime.sessions() as session:
        pair = audience_repo.pair_by_id(session, pair_id)
        assert pair is not None
        started = run_repo.last_started(session)[(pair.audience_id, pair.destination_id)]
    assert started == (later if moves else first)
