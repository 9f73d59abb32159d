"""Schedules (`every 2h`, `every 30m`, cron expressions) and when a pair is next due."""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from croniter import croniter

from worker.errors import ConfigError

DEFAULT_SCHEDULE = "every 2h"
_EVERY = re.compile(r"^every\s+(\d+)\s*(m|min|minutes?|h|hours?|d|days?)$", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Schedule:
    interval: timedelta | None = None
    cron: str | None = None


def parse_schedule(text: str) -> Schedule:
    """Parse `every N(m|h|d)` or a five-field cron expression (UTC)."""
    cleaned = text.strip()
    match = _EVERY.match(cleaned)
    if match:
        amount = int(match.group(1))
        if amount < 1:
            raise ConfigError(f"schedule {text!r}: the interval must be at least 1")
        seconds = amount * _UNIT_SECONDS[match.group(2)[0].lower()]
        return Schedule(interval=timedelta(seconds=seconds))
    if len(cleaned.split()) == 5 and croniter.is_valid(cleaned):
        return Schedule(cron=cleaned)
    raise ConfigError(
        f"schedule {text!r} is not understood: use 'every 2h', 'every 30m', 'every 1d' "
        "or a five-field cron expression such as '0 */3 * * *'"
    )


def next_due(schedule: Schedule, last_started_at: datetime | None, *, now: datetime) -> datetime:
    """When the pair should next run; a pair that never ran is due now."""
    if last_started_at is None:
        return now
    if schedule.interval is not None:
        return last_started_at + schedule.interval
    assert schedule.cron is not None
    due: datetime = croniter(schedule.cron, last_started_at).get_next(datetime)
    return due
