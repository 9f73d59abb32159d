"""The pair's run lock: taken (or a skipped run recorded) when a run starts, kept alive by a
heartbeat while the run waits on something slow, checked before each page is sent."""

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import AudienceDestination, SyncRun
from worker.context import ServiceContext
from worker.db import unit_of_work
from worker.domain import RunMode, RunStatus, Trigger
from worker.repositories import audiences as audience_repo
from worker.repositories import runs as run_repo

logger = logging.getLogger("audience_sync")

LOST_LOCK = "the run lost its lock (it was idle past the lock TTL)"


class LockHeartbeat:
    """Keeps a run's lock alive from a background thread while the run waits on something
    slow (a long source query, a destination's retries and 429 pauses), so a live run never
    looks dead to the next one. A killed process stops beating and its lock expires."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        pair_id: int,
        owner: str,
        *,
        ttl: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self._sessions, self._pair_id, self._owner = sessions, pair_id, owner
        self._ttl, self._clock = ttl, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lock-heartbeat", daemon=True)

    def __enter__(self) -> "LockHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl.total_seconds() / 3):
            try:
                with unit_of_work(self._sessions) as session:
                    audience_repo.extend_lock(
                        session, self._pair_id, self._owner, now=self._clock(), ttl=self._ttl
                    )
            except SQLAlchemyError as exc:  # the next beat tries again; the run goes on
                logger.warning("could not extend the lock of pair %s: %s", self._pair_id, exc)


def heartbeat(ctx: ServiceContext, pair_id: int, owner: str) -> LockHeartbeat:
    return LockHeartbeat(ctx.sessions, pair_id, owner, ttl=ctx.lock_ttl, clock=ctx.clock)


def lock_or_skip(
    ctx: ServiceContext,
    session: Session,
    pair: AudienceDestination,
    token: str,
    *,
    mode: RunMode,
    trigger: Trigger,
) -> SyncRun | None:
    """Take the pair's lock for `token`; when another run holds it, record this run as
    `skipped`, naming the holder, and return that run."""
    now = ctx.clock()
    if audience_repo.try_lock_pair(session, pair.id, token, now=now, ttl=ctx.lock_ttl):
        return None
    holder = run_repo.running_run_id(session, pair.audience_id, pair.destination_id)
    return run_repo.create_run(
        session,
        audience_id=pair.audience_id,
        destination_id=pair.destination_id,
        mode=mode,
        trigger=trigger,
        now=now,
        status=RunStatus.SKIPPED,
        error="another sync of this audience and destination is in progress"
        + (f" (run {holder})" if holder else ""),
    )


def still_held(session: Session, pair_id: int, owner: str) -> bool:
    """Whether the run still holds its pair: a run taken for dead (its lock expired and
    another run took it over) must not send what it computed back then."""
    return audience_repo.holds_lock(session, pair_id, owner)
