"""Per-process wiring: one engine, one session factory, one destination pool, one service."""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.alerts import AlertNotifier
from worker.context import utcnow
from worker.crashpoints import kill_at
from worker.db import make_engine, make_session_factory
from worker.domain import NoProgress, Progress
from worker.pool import DestinationPool, LimiterFactory, http_options, local_limiter
from worker.service import SyncService
from worker.settings import Settings
from worker.sources import dispose_source_engines


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    destinations: DestinationPool
    service: SyncService
    alerts: AlertNotifier

    def close(self) -> None:
        self.alerts.wait()
        self.destinations.close()
        dispose_source_engines()
        self.engine.dispose()


def build_runtime(
    settings: Settings,
    *,
    limiter_factory: LimiterFactory = local_limiter,
    progress: Callable[[], Progress] = NoProgress,
    env: Mapping[str, str] | None = None,
) -> Runtime:
    """Wire one process. `env` resolves `${VAR}` references (the process environment by
    default); `settings.crash_at` arms the guarantee tests' kill switch."""
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    # One env for both: a destination's `${VAR}` is resolved where a source's is.
    env = os.environ if env is None else env
    destinations = DestinationPool(
        http=http_options(settings), limiter_factory=limiter_factory, env=env
    )
    alerts = AlertNotifier(
        sessions=sessions,
        env=env,
        clock=utcnow,
        public_url=settings.public_url,
    )
    service = SyncService(
        session_factory=sessions,
        settings=settings,
        destinations=destinations,
        progress=progress,
        env=env,
        crash_point=kill_at(settings.crash_at),
        run_ended=alerts.run_ended,
    )
    return Runtime(settings, engine, sessions, destinations, service, alerts)
