"""Snapshot writes (bulk), counts and pruning."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from models import Snapshot, SnapshotMember
from worker.repositories.dialect import insert_for, is_postgresql
from worker.sources import SourceRow

# Snapshots this large refresh the planner's statistics before they are diffed.
ANALYZE_THRESHOLD = 10_000


def create_snapshot(session: Session, audience_id: int, *, now: datetime) -> int:
    snapshot = Snapshot(audience_id=audience_id, created_at=now, member_count=0)
    session.add(snapshot)
    session.flush()
    return snapshot.id


def add_members(session: Session, snapshot_id: int, rows: Sequence[SourceRow]) -> None:
    """Insert one chunk of members; a duplicate id within the result is kept once.

    PostgreSQL gets the chunk through COPY into a staging table and one INSERT ... SELECT;
    other backends through one multi-row INSERT per chunk.
    """
    if not rows:
        return
    if is_postgresql(session):
        _copy_members(session, snapshot_id, rows)
        return
    table = SnapshotMember.__table__
    statement = insert_for(session, table).on_conflict_do_nothing()  # type: ignore[arg-type]
    session.execute(
        statement,
        [
            {
                "snapshot_id": snapshot_id,
                "member_id": row.member_id,
                "is_anonymous": row.is_anonymous,
                "email": row.email,
            }
            for row in rows
        ],
    )


def _copy_members(session: Session, snapshot_id: int, rows: Sequence[SourceRow]) -> None:
    driver: Any = session.connection().connection.driver_connection
    with driver.cursor() as cursor:
        # Lives until the snapshot's transaction ends; duplicates are dropped on the way in.
        cursor.execute(
            "CREATE TEMP TABLE IF NOT EXISTS snapshot_stage "
            "(member_id text, is_anonymous boolean, email text) ON COMMIT DROP"
        )
        with cursor.copy("COPY snapshot_stage (member_id, is_anonymous, email) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((row.member_id, row.is_anonymous, row.email))
        cursor.execute(
            "INSERT INTO snapshot_members (snapshot_id, member_id, is_anonymous, email) "
            "SELECT %s, member_id, is_anonymous, email FROM snapshot_stage "
            "ON CONFLICT DO NOTHING",
            (snapshot_id,),
        )
        cursor.execute("TRUNCATE snapshot_stage")


def finish_snapshot(session: Session, snapshot_id: int) -> int:
    """Store and return the member count of a fully written snapshot."""
    count = (
        session.scalar(
            select(func.count())
            .select_from(SnapshotMember)
            .where(SnapshotMember.snapshot_id == snapshot_id)
        )
        or 0
    )
    session.execute(update(Snapshot).where(Snapshot.id == snapshot_id).values(member_count=count))
    if count >= ANALYZE_THRESHOLD and is_postgresql(session):
        # Fresh statistics, so the diff that follows is planned as hash anti-joins.
        session.execute(text("ANALYZE snapshot_members"))
    return count


def previous_member_count(session: Session, audience_id: int, before_id: int) -> int | None:
    """Member count of the audience's latest snapshot before `before_id` (None: first)."""
    return session.scalar(
        select(Snapshot.member_count)
        .where(Snapshot.audience_id == audience_id, Snapshot.id < before_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    )


def delete_snapshot(session: Session, snapshot_id: int) -> None:
    session.execute(delete(SnapshotMember).where(SnapshotMember.snapshot_id == snapshot_id))
    session.execute(delete(Snapshot).where(Snapshot.id == snapshot_id))


def prune_snapshots(session: Session, audience_id: int, *, keep: int, protect: set[int]) -> int:
    """Delete all but the newest `keep` snapshots of the audience (never those in `protect`,
    which running syncs still read). Returns how many were deleted."""
    keep_ids = session.scalars(
        select(Snapshot.id)
        .where(Snapshot.audience_id == audience_id)
        .order_by(Snapshot.id.desc())
        .limit(keep)
    ).all()
    doomed = session.scalars(
        select(Snapshot.id).where(
            Snapshot.audience_id == audience_id,
            Snapshot.id.not_in(set(keep_ids) | protect),
        )
    ).all()
    for snapshot_id in doomed:
        delete_snapshot(session, snapshot_id)
    return len(doomed)


def latest_membership(
    session: Session, audience_id: int, member_id: str
) -> tuple[int, datetime, bool] | None:
    """(snapshot id, taken at, whether the user is a member) of the audience's latest
    snapshot; None before its first."""
    latest = session.execute(
        select(Snapshot.id, Snapshot.created_at)
        .where(Snapshot.audience_id == audience_id)
        .order_by(Snapshot.id.desc())
        .limit(1)
    ).first()
    if latest is None:
        return None
    is_member = session.scalar(
        select(SnapshotMember.member_id).where(
            SnapshotMember.snapshot_id == latest[0], SnapshotMember.member_id == member_id
        )
    )
    return latest[0], latest[1], is_member is not None


def member_history(
    session: Session, audience_id: int, member_id: str
) -> list[tuple[datetime, bool]]:
    """When the user entered (True) or exited (False) the audience over the kept history,
    oldest first: one entry per change of membership, dated by the snapshot that saw it (a
    member of the oldest kept snapshot counts as entered then)."""
    taken = session.execute(
        select(Snapshot.id, Snapshot.created_at)
        .where(Snapshot.audience_id == audience_id)
        .order_by(Snapshot.id)
    ).all()
    holding = set(
        session.scalars(
            select(SnapshotMember.snapshot_id).where(
                SnapshotMember.snapshot_id.in_([snapshot_id for snapshot_id, _ in taken]),
                SnapshotMember.member_id == member_id,
            )
        )
    )
    events: list[tuple[datetime, bool]] = []
    was_member = False
    for snapshot_id, created_at in taken:
        is_member = snapshot_id in holding
        if is_member != was_member:
            events.append((created_at, is_member))
        was_member = is_member
    return events
