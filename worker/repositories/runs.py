"""sync_runs: the runs of each pair, their counters and outcome (its only writer)."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models import Audience, Destination, SyncRun
from worker.domain import RunMode, RunStatus, Trigger

INTERRUPTED = "interrupted: the process running this sync stopped before it finished"


def create_run(
    session: Session,
    *,
    audience_id: int,
    destination_id: int,
    mode: RunMode,
    trigger: Trigger,
    now: datetime,
    status: RunStatus = RunStatus.RUNNING,
    error: str | None = None,
    host: str | None = None,
    pid: int | None = None,
    task_id: str | None = None,
) -> SyncRun:
    run = SyncRun(
        host=host,
        pid=pid,
        task_id=task_id,
        audience_id=audience_id,
        destination_id=destination_id,
        mode=mode,
        trigger=trigger,
        status=status,
        started_at=now,
        finished_at=None if status == RunStatus.RUNNING else now,
        members=0,
        entered=0,
        exited=0,
        sent=0,
        failed=0,
        skipped_rows={},
        error=error,
    )
    session.add(run)
    session.flush()
    return run


def close_interrupted_runs(
    session: Session, audience_id: int, destination_id: int, *, now: datetime
) -> int:
    """Mark runs left `running` by a dead process as failed. Call only with the pair lock
    held: then no live run of the pair can be among them."""
    result = session.execute(
        update(SyncRun)
        .where(
            SyncRun.audience_id == audience_id,
            SyncRun.destination_id == destination_id,
            SyncRun.status == RunStatus.RUNNING,
        )
        .values(status=RunStatus.FAILED, error=INTERRUPTED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def running_run_id(session: Session, audience_id: int, destination_id: int) -> int | None:
    return session.scalar(
        select(SyncRun.id)
        .where(
            SyncRun.audience_id == audience_id,
            SyncRun.destination_id == destination_id,
            SyncRun.status == RunStatus.RUNNING,
        )
        .order_by(SyncRun.id.desc())
        .limit(1)
    )


def update_run(session: Session, run_id: int, **values: Any) -> None:
    session.execute(
        update(SyncRun)
        .where(SyncRun.id == run_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def close_run(
    session: Session, run_id: int, *, status: RunStatus, error: str | None, finished_at: datetime
) -> bool:
    """Record a running run's outcome; False (nothing written) if it is closed already, so
    the first outcome stays."""
    result = session.execute(
        update(SyncRun)
        .where(SyncRun.id == run_id, SyncRun.status == RunStatus.RUNNING)
        .values(status=status, error=error, finished_at=finished_at)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


def record_delivery_seconds(session: Session, run_id: int, *, finished_at: datetime) -> None:
    """Time the run's delivery, from its recorded start to `finished_at`; nothing for a
    run that never reached delivery."""
    began = session.scalar(select(SyncRun.delivery_started_at).where(SyncRun.id == run_id))
    if began is not None:
        seconds = max(0.0, (finished_at - began).total_seconds())
        update_run(session, run_id, delivery_seconds=seconds)


def add_to_counters(session: Session, run_id: int, *, sent: int, failed: int) -> None:
    """Increment the run's counters in SQL, so parallel chunk workers never overwrite."""
    session.execute(
        update(SyncRun)
        .where(SyncRun.id == run_id)
        .values(sent=SyncRun.sent + sent, failed=SyncRun.failed + failed)
        .execution_options(synchronize_session=False)
    )


def get_run(session: Session, run_id: int) -> SyncRun | None:
    return session.get(SyncRun, run_id)


def history(
    session: Session, *, audience_key: str | None = None, limit: int = 20
) -> Sequence[tuple[SyncRun, str, str]]:
    query = (
        select(SyncRun, Audience.key, Destination.name)
        .join(Audience, Audience.id == SyncRun.audience_id)
        .join(Destination, Destination.id == SyncRun.destination_id)
        .order_by(SyncRun.id.desc())
        .limit(limit)
    )
    if audience_key is not None:
        query = query.where(Audience.key == audience_key)
    return [(run, key, name) for run, key, name in session.execute(query).all()]


def last_started(session: Session) -> dict[tuple[int, int], datetime]:
    """Start time of each pair's latest run that counts for its schedule. Dry runs, skipped
    runs and blocked manual runs do not: they sent nothing, so they do not move the
    schedule. A blocked scheduled run does count: it took its slot (the pair tries again at
    the next one instead of reading a broken source every minute)."""
    rows = session.execute(
        select(SyncRun.audience_id, SyncRun.destination_id, func.max(SyncRun.started_at))
        .where(
            SyncRun.status != RunStatus.SKIPPED,
            SyncRun.mode != RunMode.DRY_RUN,
            # A run made full because one was owed may have been the scheduled one.
            or_(
                SyncRun.status != RunStatus.BLOCKED,
                SyncRun.trigger.in_([Trigger.SCHEDULE, Trigger.FULL_OWED]),
            ),
        )
        .group_by(SyncRun.audience_id, SyncRun.destination_id)
    ).all()
    return {(a, d): started for a, d, started in rows}


def latest_runs(session: Session) -> dict[tuple[int, int], SyncRun]:
    latest = (
        select(func.max(SyncRun.id))
        .group_by(SyncRun.audience_id, SyncRun.destination_id)
        .scalar_subquery()
    )
    return {
        (run.audience_id, run.destination_id): run
        for run in session.scalars(select(SyncRun).where(SyncRun.id.in_(latest)))
    }


def snapshots_in_use(session: Session, audience_id: int) -> set[int]:
    """Snapshots that running syncs of the audience still read (never pruned)."""
    return {
        snapshot_id
        for snapshot_id in session.scalars(
            select(SyncRun.snapshot_id).where(
                SyncRun.audience_id == audience_id,
                SyncRun.status == RunStatus.RUNNING,
                SyncRun.snapshot_id.is_not(None),
            )
        )
        if snapshot_id is not None
    }


def request_cancel(session: Session, run_id: int, *, now: datetime) -> bool:
    """Ask a running run to stop at its next page boundary; whether it was running."""
    result = session.execute(
        update(SyncRun)
        .where(SyncRun.id == run_id, SyncRun.status == RunStatus.RUNNING)
        .values(cancel_requested_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def is_cancel_requested(session: Session, run_id: int) -> bool:
    return (
        session.scalar(select(SyncRun.cancel_requested_at).where(SyncRun.id == run_id)) is not None
    )


def user_runs(session: Session, run_ids: set[int]) -> dict[int, SyncRun]:
    """The runs with these ids, by id (those that still exist)."""
    if not run_ids:
        return {}
    return {run.id: run for run in session.scalars(select(SyncRun).where(SyncRun.id.in_(run_ids)))}
