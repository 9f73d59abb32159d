"""Per-process wiring: one engine, one session factory, one destination pool, one service."""

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, make_session_factory
from worker.pool import DestinationPool, LimiterFactory, http_options, local_limiter
from worker.service import NoProgress, Progress, SyncService
from worker.settings import Settings
from worker.sources import dispose_source_engines


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    destinations: DestinationPool
    service: SyncService

    def close(self) -> None:
        self.destinations.close()
        dispose_source_engines()
        self.engine.dispose()


def build_runtime(
    settings: Settings,
    *,
    limiter_factory: LimiterFactory = local_limiter,
    progress: Callable[[], Progress] = NoProgress,
) -> Runtime:
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    destinations = DestinationPool(http=http_options(settings), limiter_factory=limiter_factory)
    service = SyncService(
        session_factory=sessions, settings=settings, destinations=destinations, progress=progress
    )
    return Runtime(settings, engine, sessions, destinations, service)
