"""Tests of worker.scheduling: schedules parsed and next due times, as tables."""

from datetime import UTC, datetime, timedelta

import pytest

from worker.errors import ConfigError
from worker.scheduling import DEFAULT_SCHEDULE, Schedule, is_due, next_due, parse_schedule

NOW = datetime(2026, 11, 28, 12, 34, 56, tzinfo=UTC)


def at(hour: int, minute: int = 0, second: int = 0, *, day: int = 28) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("every 2h", Schedule(interval=timedelta(hours=2))),
        ("every 30m", Schedule(interval=timedelta(minutes=30))),
        ("every 1d", Schedule(interval=timedelta(days=1))),
        ("every 1 min", Schedule(interval=timedelta(minutes=1))),
        ("every 45 minutes", Schedule(interval=timedelta(minutes=45))),
        ("every 1 minute", Schedule(interval=timedelta(minutes=1))),
        ("every 3 hours", Schedule(interval=timedelta(hours=3))),
        ("every 1 hour", Schedule(interval=timedelta(hours=1))),
        ("every 2 days", Schedule(interval=timedelta(days=2))),
        ("Every 2H", Schedule(interval=timedelta(hours=2))),
        ("  every 2h  ", Schedule(interval=timedelta(hours=2))),
        ("every 90m", Schedule(interval=timedelta(minutes=90))),
        ("0 */3 * * *", Schedule(cron="0 */3 * * *")),
        ("*/15 * * * *", Schedule(cron="*/15 * * * *")),
        ("30 6 * * 1-5", Schedule(cron="30 6 * * 1-5")),
        (" 0 0 1 * * ", Schedule(cron="0 0 1 * *")),
    ],
)
def test_parse_schedule(text: str, expected: Schedule) -> None:
    assert parse_schedule(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "every",
        "every 0h",
        "every 0m",
        "every -1h",
        "every 2",
        "every 2w",
        "every two hours",
        "2h",
        "hourly",
        "@hourly",
        "0 */3 * *",
        "0 */3 * * * *",
        "61 * * * *",
        "* 25 * * *",
        "not a cron at all",
    ],
)
def test_parse_schedule_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="schedule"):
        parse_schedule(text)


def test_default_schedule_is_the_seed_cadence() -> None:
    assert parse_schedule(DEFAULT_SCHEDULE) == Schedule(interval=timedelta(hours=2))


@pytest.mark.parametrize(
    ("schedule", "last_started_at", "expected"),
    [
        # A pair that never ran is due at once, whatever its schedule.
        ("every 2h", None, NOW),
        ("0 */3 * * *", None, NOW),
        # Intervals count from the last run's start.
        ("every 2h", at(10, 0), at(12, 0)),
        ("every 2h", at(11, 0), at(13, 0)),
        ("every 30m", at(12, 10), at(12, 40)),
        ("every 1d", at(12, 0, day=27), at(12, 0)),
        ("every 2h", at(10, 34, 56), NOW),
        # Long overdue: the due time is in the past, so the pair is due now.
        ("every 2h", at(1, 0), at(3, 0)),
        # Cron: the first slot strictly after the last start.
        ("0 */3 * * *", at(11, 0), at(12, 0)),
        ("0 */3 * * *", at(12, 0), at(15, 0)),
        ("0 */3 * * *", at(12, 0, 1), at(15, 0)),
        ("*/15 * * * *", at(12, 31), at(12, 45)),
        ("30 6 * * *", at(7, 0), at(6, 30, day=29)),
        ("0 0 * * *", at(23, 59, day=27), at(0, 0)),
    ],
)
def test_next_due(schedule: str, last_started_at: datetime | None, expected: datetime) -> None:
    assert next_due(parse_schedule(schedule), last_started_at, now=NOW) == expected


@pytest.mark.parametrize(
    ("schedule", "last_started_at", "due"),
    [
        ("every 2h", None, True),
        ("every 2h", NOW - timedelta(hours=2), True),
        # Within half of beat's one-minute tick: this tick is the nearest to the due time.
        ("every 2h", NOW - timedelta(hours=2) + timedelta(seconds=1), True),
        ("every 2h", NOW - timedelta(hours=2) + timedelta(seconds=30), True),
        ("every 2h", NOW - timedelta(hours=2) + timedelta(seconds=31), False),
        ("every 1m", NOW - timedelta(seconds=58), True),
        ("every 1m", NOW - timedelta(seconds=29), False),
        ("every 30m", NOW - timedelta(minutes=31), True),
        ("every 30m", NOW - timedelta(minutes=29), False),
        ("0 */3 * * *", at(11, 59), True),  # the 12:00 slot passed
        ("0 */3 * * *", at(12, 0), False),  # ran in the 12:00 slot; next is 15:00
        ("35 12 * * *", at(12, 0), True),  # 12:35:00 is 4 s away: no later tick is nearer
        ("36 12 * * *", at(12, 0), False),
        # A run a few seconds early for its slot took it: the slot is not run again.
        ("35 12 * * *", at(12, 34, 50), False),
    ],
)
def test_due_now(schedule: str, last_started_at: datetime | None, due: bool) -> None:
    assert is_due(next_due(parse_schedule(schedule), last_started_at, now=NOW), now=NOW) is due


@pytest.mark.parametrize(
    ("next_due_at", "due"),
    [
        (NOW, True),
        (NOW - timedelta(days=3), True),
        (NOW + timedelta(seconds=30), True),
        (NOW + timedelta(seconds=30, microseconds=1), False),
        (NOW + timedelta(minutes=1), False),
    ],
)
def test_is_due_within_half_a_tick(next_due_at: datetime, due: bool) -> None:
    assert is_due(next_due_at, now=NOW) is due
    assert is_due(next_due_at, now=NOW, tick=timedelta(seconds=0)) is (next_due_at <= NOW)
