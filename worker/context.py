"""What every part of the service shares: the state database's sessions, the settings, the
destination clients, the clock, the environment, progress reporting and the crash hook."""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from worker.crashpoints import CrashPoint
from worker.db import unit_of_work
from worker.domain import Progress, RunSummary
from worker.pool import DestinationPool
from worker.settings import Settings


def utcnow() -> datetime:
    return datetime.now(UTC)


# Called once a run is recorded as ended (alerts); it must never raise.
RunEndHook = Callable[[RunSummary], None]


def ignore_run_end(_summary: RunSummary) -> None:
    """The default run-end hook: nothing to tell."""


@dataclass(frozen=True, slots=True)
class ServiceContext:
    sessions: sessionmaker[Session]
    settings: Settings
    destinations: DestinationPool
    clock: Callable[[], datetime]
    progress: Callable[[], Progress]
    # Resolves `${VAR}` references in source URLs; given by the process's edge.
    env: Mapping[str, str]
    crash_point: CrashPoint
    run_ended: RunEndHook = ignore_run_end

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One step's transaction, committed when the block ends without an error."""
        with unit_of_work(self.sessions) as session:
            yield session

    @property
    def lock_ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.lock_ttl_seconds)
