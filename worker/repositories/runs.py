"""Sync runs, per-user delivery failures and the synced state they move."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from models import (
    Audience,
    DeliveryFailure,
    Destination,
    FailingMember,
    SyncedMember,
    SyncRun,
)
from worker.payloads import Change
from worker.repositories.dialect import insert_for

RUNNING = "running"
SUCCEEDED = "succeeded"
PARTIAL = "partial"
FAILED = "failed"
SKIPPED = "skipped"
BLOCKED = "blocked"
FINAL_STATUSES = (SUCCEEDED, PARTIAL, FAILED, SKIPPED, BLOCKED)
# A run that moved this many users refreshes the planner's statistics of the synced state.
ANALYZE_AFTER_SENT = 10_000
INTERRUPTED = "interrupted: the process running this sync stopped before it finished"


def create_run(
    session: Session,
    *,
    audience_id: int,
    destination_id: int,
    mode: str,
    trigger: str,
    now: datetime,
    status: str = RUNNING,
    error: str | None = None,
) -> SyncRun:
    run = SyncRun(
        audience_id=audience_id,
        destination_id=destination_id,
        mode=mode,
        trigger=trigger,
        status=status,
        started_at=now,
        finished_at=None if status == RUNNING else now,
        members=0,
        entered=0,
        exited=0,
        sent=0,
        failed=0,
        skipped_rows={},
        error=error,
        pending_chunks=0,
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
            SyncRun.status == RUNNING,
        )
        .values(status=FAILED, error=INTERRUPTED, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def running_run_id(session: Session, audience_id: int, destination_id: int) -> int | None:
    return session.scalar(
        select(SyncRun.id)
        .where(
            SyncRun.audience_id == audience_id,
            SyncRun.destination_id == destination_id,
            SyncRun.status == RUNNING,
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
    """Start time of each pair's latest run that did real work (not skipped)."""
    rows = session.execute(
        select(SyncRun.audience_id, SyncRun.destination_id, func.max(SyncRun.started_at))
        .where(SyncRun.status != SKIPPED)
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


def failures_of_run(
    session: Session, run_id: int, *, limit: int = 1000
) -> Sequence[DeliveryFailure]:
    return session.scalars(
        select(DeliveryFailure)
        .where(DeliveryFailure.run_id == run_id)
        .order_by(DeliveryFailure.id)
        .limit(limit)
    ).all()


def record_accepted(
    session: Session,
    *,
    audience_id: int,
    destination_id: int,
    run_id: int,
    changes: Sequence[Change],
    now: datetime,
    has_failing_members: bool = True,
) -> None:
    """Advance the synced state of accepted users (one bulk upsert) and clear their failures
    (skipped when the pair had none when the run started)."""
    if not changes:
        return
    if session.get_bind().dialect.name == "postgresql":
        # One statement for the whole page: arrays in, unnest, upsert.
        session.execute(
            text(
                "INSERT INTO synced_members (audience_id, destination_id, member_id, "
                "is_anonymous, is_member, email, updated_at, run_id) "
                "SELECT :audience_id, :destination_id, m, a, v, e, :now, :run_id "
                "FROM unnest(CAST(:ids AS text[]), CAST(:anons AS boolean[]), "
                "CAST(:values AS boolean[]), CAST(:emails AS text[])) AS t(m, a, v, e) "
                "ON CONFLICT (audience_id, destination_id, member_id) DO UPDATE SET "
                "is_member = excluded.is_member, is_anonymous = excluded.is_anonymous, "
                "email = excluded.email, updated_at = excluded.updated_at, "
                "run_id = excluded.run_id"
            ),
            {
                "audience_id": audience_id,
                "destination_id": destination_id,
                "now": now,
                "run_id": run_id,
                "ids": [c.member_id for c in changes],
                "anons": [c.is_anonymous for c in changes],
                "values": [c.value for c in changes],
                "emails": [c.email for c in changes],
            },
        )
    else:
        table = SyncedMember.__table__
        statement = insert_for(session, table)  # type: ignore[arg-type]
        statement = statement.on_conflict_do_update(
            index_elements=["audience_id", "destination_id", "member_id"],
            set_={
                "is_member": statement.excluded.is_member,
                "is_anonymous": statement.excluded.is_anonymous,
                "email": statement.excluded.email,
                "updated_at": statement.excluded.updated_at,
                "run_id": statement.excluded.run_id,
            },
        )
        session.execute(
            statement,
            [
                {
                    "audience_id": audience_id,
                    "destination_id": destination_id,
                    "member_id": change.member_id,
                    "is_anonymous": change.is_anonymous,
                    "is_member": change.value,
                    "email": change.email,
                    "updated_at": now,
                    "run_id": run_id,
                }
                for change in changes
            ],
        )
    if has_failing_members:
        session.execute(
            delete(FailingMember).where(
                FailingMember.audience_id == audience_id,
                FailingMember.destination_id == destination_id,
                FailingMember.member_id.in_([change.member_id for change in changes]),
            )
        )


def record_rejected(
    session: Session,
    *,
    audience_id: int,
    destination_id: int,
    run_id: int,
    rejected: Sequence[tuple[Change, int | None, str]],
    quarantine_after: int,
    now: datetime,
) -> None:
    """Store each rejection on the run and count it towards the user's quarantine."""
    if not rejected:
        return
    session.execute(
        DeliveryFailure.__table__.insert(),  # type: ignore[attr-defined]
        [
            {
                "run_id": run_id,
                "member_id": change.member_id,
                "value": change.value,
                "status": status,
                "message": message[:2000],
            }
            for change, status, message in rejected
        ],
    )
    table = FailingMember.__table__
    statement = insert_for(session, table)  # type: ignore[arg-type]
    count = FailingMember.consecutive_failures + 1
    statement = statement.on_conflict_do_update(
        index_elements=["audience_id", "destination_id", "member_id"],
        set_={
            "consecutive_failures": count,
            "is_quarantined": count >= quarantine_after,
            "last_value": statement.excluded.last_value,
            "last_status": statement.excluded.last_status,
            "last_message": statement.excluded.last_message,
            "last_run_id": statement.excluded.last_run_id,
            "updated_at": statement.excluded.updated_at,
        },
    )
    session.execute(
        statement,
        [
            {
                "audience_id": audience_id,
                "destination_id": destination_id,
                "member_id": change.member_id,
                "consecutive_failures": 1,
                "is_quarantined": quarantine_after <= 1,
                "last_value": change.value,
                "last_status": status,
                "last_message": message[:2000],
                "last_run_id": run_id,
                "updated_at": now,
            }
            for change, status, message in rejected
        ],
    )


def failing_members(
    session: Session, *, audience_key: str | None = None, only_quarantined: bool = True
) -> Sequence[tuple[FailingMember, str, str]]:
    query = (
        select(FailingMember, Audience.key, Destination.name)
        .join(Audience, Audience.id == FailingMember.audience_id)
        .join(Destination, Destination.id == FailingMember.destination_id)
        .order_by(Audience.key, Destination.name, FailingMember.member_id)
    )
    if only_quarantined:
        query = query.where(FailingMember.is_quarantined.is_(True))
    if audience_key is not None:
        query = query.where(Audience.key == audience_key)
    return [(row, key, name) for row, key, name in session.execute(query).all()]


def release_quarantine(session: Session, audience_id: int, destination_id: int) -> int:
    """Let quarantined users of a pair be tried again (their counts start over)."""
    result = session.execute(
        update(FailingMember)
        .where(
            FailingMember.audience_id == audience_id,
            FailingMember.destination_id == destination_id,
            FailingMember.is_quarantined.is_(True),
        )
        .values(is_quarantined=False, consecutive_failures=0)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def snapshots_in_use(session: Session, audience_id: int) -> set[int]:
    """Snapshots that running syncs of the audience still read (never pruned)."""
    return {
        snapshot_id
        for snapshot_id in session.scalars(
            select(SyncRun.snapshot_id).where(
                SyncRun.audience_id == audience_id,
                SyncRun.status == RUNNING,
                SyncRun.snapshot_id.is_not(None),
            )
        )
        if snapshot_id is not None
    }


def has_failing_members(session: Session, audience_id: int, destination_id: int) -> bool:
    return (
        session.scalar(
            select(FailingMember.member_id)
            .where(
                FailingMember.audience_id == audience_id,
                FailingMember.destination_id == destination_id,
            )
            .limit(1)
        )
        is not None
    )


def refresh_statistics(session: Session) -> None:
    """After a large run on PostgreSQL: fresh statistics keep the next diff's plan right."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE synced_members"))
