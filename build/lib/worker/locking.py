"""The pair's run lock: taken (or a skipped run recorded) when a run starts, kept alive by a
heartbeat while the run waits on something slow, checked before each page is sent. Also
where a run runs (host, pid, Celery task), how `status` reads a held lock, and the requests
to stop a run at its next page boundary (a signal to this process, or `runs cancel`)."""

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models import AudienceDestination, SyncRun
from worker.context import ServiceContext
from worker.db import unit_of_work
from worker.domain import RunMode, RunStatus, Trigger
from worker.errors import DestinationError
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
    host, pid, task_id = where_this_runs()
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
        host=host,
        pid=pid,
        task_id=task_id,
    )


def still_held(session: Session, pair_id: int, owner: str) -> bool:
    """Whether the run still holds its pair: a run taken for dead (its lock expired and
    another run took it over) must not send what it computed back then."""
    return audience_repo.holds_lock(session, pair_id, owner)


# ---------------------------------------------------------------- where a run runs


def where_this_runs() -> tuple[str, int, str | None]:
    """(host, pid, Celery task id or None) of the calling code, recorded on its run."""
    task_id = None
    # Only a Celery worker has a current task, and it has imported Celery already: a CLI
    # run does not pay for importing it.
    if "celery" in sys.modules:
        from celery import current_task

        if current_task and current_task.request.id:
            task_id = str(current_task.request.id)
    return socket.gethostname(), os.getpid(), task_id


def is_process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 tests without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@dataclass(frozen=True, slots=True)
class LockHolder:
    """What `status` knows of the run holding a pair's lock."""

    run_id: int | None
    host: str | None
    pid: int | None
    lock_expires_at: datetime


STALE_HERE = "stale (lock held by a dead process on this host)"


def run_state(
    holder: LockHolder | None,
    *,
    now: datetime,
    ttl: timedelta,
    this_host: str,
    is_alive: Callable[[int], bool],
) -> str | None:
    """How `status` describes the run holding a pair (None: nobody holds it).

    A run on this host is `running` while its process lives and `stale` once it died (its
    lock then expires by itself, or `runs cancel --force` frees it at once); a run on
    another host cannot be checked, so its last heartbeat is told instead.
    """
    if holder is None:
        return None
    beat = max(0, round((now - (holder.lock_expires_at - ttl)).total_seconds()))
    is_live = holder.lock_expires_at > now
    if holder.host == this_host and holder.pid is not None:
        if is_alive(holder.pid):
            return "running" if is_live else f"running (heartbeat {beat} s ago, lock expired)"
        return STALE_HERE
    if holder.host is None:  # taken a moment ago, not yet handed to its run
        return "running" if is_live else None
    where = f"{holder.host}, pid {holder.pid}, heartbeat {beat} s ago"
    return f"running elsewhere ({where})" if is_live else f"stale (lock expired; {where})"


# ---------------------------------------------------------------- stopping a run


class RunStopped(DestinationError):
    """A run was asked to stop (a signal, `runs cancel`): raised at a page boundary."""


class StopRequest:
    """This process was asked to stop its runs at their next page boundary (set from a
    signal handler, read by the delivery loop of any thread)."""

    def __init__(self) -> None:
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        return self._reason

    def request(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def clear(self) -> None:
        self._reason = None


# Signals reach a process, not a run: one request per process.
PROCESS_STOP = StopRequest()
CANCELLED_BY_OPERATOR = "cancelled with `audience-sync runs cancel`"


def check_stop(session: Session, run_id: int) -> None:
    """At a page boundary: raise RunStopped if this process got a stop signal or an
    operator asked the run to stop (the flag is read with the page's lock check)."""
    if PROCESS_STOP.reason is not None:
        raise RunStopped(PROCESS_STOP.reason)
    if run_repo.is_cancel_requested(session, run_id):
        raise RunStopped(CANCELLED_BY_OPERATOR)
