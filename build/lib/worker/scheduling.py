"""Schedules (`every 2h`, `every 30m`, cron expressions) and when a pair is next due.

Beat wakes the dispatcher once a minute (`DISPATCH_TICK`), and a run starts a moment after
the tick that queued it. So a pair is due when its next due time falls within half a tick
of now: `every 1m` then runs at every tick rather than every other one, and a cron slot is
taken by the tick nearest to it. A cron schedule counts its next slot from half a tick after
the last start, so a run started a few seconds before its slot is not run again at it.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from croniter import croniter

from worker.errors import ConfigError

DEFAULT_SCHEDULE = "every 2h"
# How often beat wakes the dispatcher (worker.celery schedules it at this period).
DISPATCH_TICK = timedelta(minutes=1)
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


def next_due(
    schedule: Schedule,
    last_started_at: datetime | None,
    *,
    now: datetime,
    tick: timedelta = DISPATCH_TICK,
) -> datetime:
    """When the pair should next run; a pair that never ran is due now. `last_started_at`
    is the start of the pair's last run that counts for its schedule (see
    `repositories.runs.last_started`)."""
    if last_started_at is None:
        return now
    if schedule.interval is not None:
        return last_started_at + schedule.interval
    assert schedule.cron is not None
    due: datetime = croniter(schedule.cron, last_started_at + tick / 2).get_next(datetime)
    return due


def is_due(next_due_at: datetime, *, now: datetime, tick: timedelta = DISPATCH_TICK) -> bool:
    """Whether a pair due at `next_due_at` should start at the tick at `now`: the due time
    is at most half a tick away (the next tick would be further from it)."""
    return next_due_at <= now + tick / 2
