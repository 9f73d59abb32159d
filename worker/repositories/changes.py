"""The diff: set-based anti-joins between a snapshot and a destination's synced state.

Changes are read page by page in member_id order (keyset pagination), so neither side is
ever loaded whole into Python and a page's writes never disturb the pages after it.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, false, func, literal, null, or_, select, text, true
from sqlalchemy.orm import Session

from models import FailingMember, SnapshotMember, SyncedMember
from models.base import UTCDateTime
from worker.payloads import Change
from worker.repositories.dialect import insert_for

ENTER = "enter"  # `true` for members (every member in a full sync)
EXIT = "exit"  # `false` for users the destination holds as members who left
PHASES = (EXIT, ENTER)


@dataclass(frozen=True, slots=True)
class PairScope:
    audience_id: int
    destination_id: int
    snapshot_id: int
    is_full: bool = False
    include_quarantined: bool = False


def _synced_join(scope: PairScope) -> Any:
    return and_(
        SyncedMember.audience_id == scope.audience_id,
        SyncedMember.destination_id == scope.destination_id,
        SyncedMember.member_id == SnapshotMember.member_id,
    )


def _not_quarantined(scope: PairScope, member_id: Any) -> Any:
    if scope.include_quarantined:
        return true()
    return ~exists().where(
        FailingMember.audience_id == scope.audience_id,
        FailingMember.destination_id == scope.destination_id,
        FailingMember.member_id == member_id,
        FailingMember.is_quarantined.is_(True),
    )


def _is_failing(scope: PairScope, member_id: Any) -> Any:
    """The user's last call was rejected, or a run that stopped may have sent it one it never
    recorded: the destination's value is not known, so the user gets its current value."""
    return exists().where(
        FailingMember.audience_id == scope.audience_id,
        FailingMember.destination_id == scope.destination_id,
        FailingMember.member_id == member_id,
    )


def _enter_select(scope: PairScope, *columns: Any) -> Any:
    query = (
        select(*columns)
        .select_from(SnapshotMember)
        .outerjoin(SyncedMember, _synced_join(scope))
        .where(SnapshotMember.snapshot_id == scope.snapshot_id)
        .where(_not_quarantined(scope, SnapshotMember.member_id))
    )
    if not scope.is_full:
        query = query.where(
            or_(
                SyncedMember.is_member.is_(None),
                SyncedMember.is_member == false(),
                _is_failing(scope, SnapshotMember.member_id),
            )
        )
    return query


def _exit_select(scope: PairScope, *columns: Any) -> Any:
    in_snapshot = exists().where(
        SnapshotMember.snapshot_id == scope.snapshot_id,
        SnapshotMember.member_id == SyncedMember.member_id,
    )
    return (
        select(*columns)
        .where(
            SyncedMember.audience_id == scope.audience_id,
            SyncedMember.destination_id == scope.destination_id,
            or_(SyncedMember.is_member.is_(True), _is_failing(scope, SyncedMember.member_id)),
            ~in_snapshot,
        )
        .where(_not_quarantined(scope, SyncedMember.member_id))
    )


def count_changes(session: Session, scope: PairScope) -> tuple[int, int]:
    """(users to send `true`, users to send `false`)."""
    enter = session.scalar(_enter_select(scope, func.count())) or 0
    leave = session.scalar(_exit_select(scope, func.count())) or 0
    return enter, leave


def mark_in_doubt(
    session: Session,
    audience_id: int,
    destination_id: int,
    snapshot_id: int,
    *,
    run_id: int,
    now: datetime,
) -> None:
    """Record what a run that stopped while delivering (killed, or failed mid-request) may
    have told the destination without recording it: any change of its snapshot.

    Each such user gets a failing row (kept if one exists), so later runs send the user's
    current value even where the synced state already agrees with the source; a member the
    run may have told `true` first also gets a synced row (`false`), so that an exit can
    reach the user if the source drops them before that.
    """
    is_postgres = session.get_bind().dialect.name == "postgresql"
    if is_postgres:
        # The dead run wrote these without the statistics catching up: without fresh ones
        # the planner takes the tables for empty and the anti-joins below turn quadratic.
        session.execute(text("ANALYZE synced_members, snapshot_members"))
    scope = PairScope(audience_id, destination_id, snapshot_id, include_quarantined=True)
    message = f"in doubt: run {run_id} stopped before recording the destination's answer"
    failing = insert_for(session, FailingMember.__table__)  # type: ignore[arg-type]
    failing_columns = [
        "audience_id",
        "destination_id",
        "member_id",
        "consecutive_failures",
        "is_quarantined",
        "last_value",
        "last_status",
        "last_message",
        "last_run_id",
        "updated_at",
    ]
    for select_changes, member_id, value in (
        (_enter_select, SnapshotMember.member_id, True),
        (_exit_select, SyncedMember.member_id, False),
    ):
        rows = select_changes(
            scope,
            literal(audience_id),
            literal(destination_id),
            member_id,
            literal(0),
            false(),
            literal(value),
            null(),
            literal(message),
            literal(run_id),
            literal(now, UTCDateTime()),
        )
        session.execute(failing.from_select(failing_columns, rows).on_conflict_do_nothing())
    never_told = (
        select(
            literal(audience_id),
            literal(destination_id),
            SnapshotMember.member_id,
            SnapshotMember.is_anonymous,
            false(),
            SnapshotMember.email,
            literal(now, UTCDateTime()),
            null(),
        )
        .select_from(SnapshotMember)
        .outerjoin(SyncedMember, _synced_join(scope))
        .where(SnapshotMember.snapshot_id == snapshot_id, SyncedMember.member_id.is_(None))
    )
    synced = insert_for(session, SyncedMember.__table__)  # type: ignore[arg-type]
    session.execute(
        synced.from_select(
            [
                "audience_id",
                "destination_id",
                "member_id",
                "is_anonymous",
                "is_member",
                "email",
                "updated_at",
                "run_id",
            ],
            never_told,
        ).on_conflict_do_nothing()
    )
    if is_postgres:
        session.execute(text("ANALYZE failing_members, synced_members"))


def forget_moot_failures(session: Session, scope: PairScope) -> None:
    """Drop the failing rows of users who left the audience and for whom the destination
    never accepted a value: nothing is owed to them any more (were they quarantined, they
    start afresh should they come back)."""
    session.execute(
        delete(FailingMember).where(
            FailingMember.audience_id == scope.audience_id,
            FailingMember.destination_id == scope.destination_id,
            ~exists().where(
                SyncedMember.audience_id == scope.audience_id,
                SyncedMember.destination_id == scope.destination_id,
                SyncedMember.member_id == FailingMember.member_id,
            ),
            ~exists().where(
                SnapshotMember.snapshot_id == scope.snapshot_id,
                SnapshotMember.member_id == FailingMember.member_id,
            ),
        )
    )


def count_member_exits(session: Session, scope: PairScope) -> int:
    """Users to send `false` whom the destination holds as members (users in doubt aside)."""
    query = _exit_select(scope, func.count()).where(SyncedMember.is_member.is_(True))
    return session.scalar(query) or 0


def count_newly_entered(session: Session, scope: PairScope) -> int:
    """Members not yet `true` at the destination (what a full sync would also count)."""
    narrowed = PairScope(
        scope.audience_id, scope.destination_id, scope.snapshot_id, False, scope.include_quarantined
    )
    return session.scalar(_enter_select(narrowed, func.count())) or 0


def count_synced_members(session: Session, audience_id: int, destination_id: int) -> int:
    """How many users the destination holds as members (`true`)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(SyncedMember)
            .where(
                SyncedMember.audience_id == audience_id,
                SyncedMember.destination_id == destination_id,
                SyncedMember.is_member.is_(True),
            )
        )
        or 0
    )


def has_synced_state(session: Session, audience_id: int, destination_id: int) -> bool:
    return bool(
        session.scalar(
            select(literal(1))
            .where(
                SyncedMember.audience_id == audience_id,
                SyncedMember.destination_id == destination_id,
            )
            .limit(1)
        )
    )


def page_of_changes(
    session: Session,
    scope: PairScope,
    phase: str,
    *,
    after: str | None,
    upto: str | None,
    limit: int,
) -> list[Change]:
    """The next `limit` changes of a phase with member_id in (after, upto], in order."""
    if phase == ENTER:
        key = SnapshotMember.member_id
        query = _enter_select(
            scope,
            SnapshotMember.member_id,
            SnapshotMember.is_anonymous,
            SnapshotMember.email,
            SyncedMember.run_id,
        )
    else:
        key = SyncedMember.member_id
        query = _exit_select(
            scope,
            SyncedMember.member_id,
            SyncedMember.is_anonymous,
            SyncedMember.email,
            SyncedMember.run_id,
        )
    if after is not None:
        query = query.where(key > after)
    if upto is not None:
        query = query.where(key <= upto)
    rows = session.execute(query.order_by(key).limit(limit)).all()
    value = phase == ENTER
    return [Change(r[0], bool(r[1]), r[2], value, r[3]) for r in rows]


def chunk_boundaries(
    session: Session, scope: PairScope, phase: str, *, chunk_size: int
) -> list[str]:
    """Member ids that cut a phase's changes into chunks of `chunk_size` (for fan-out):
    chunk i covers (boundary[i-1], boundary[i]]; the last chunk is open-ended."""
    if phase == ENTER:
        key = SnapshotMember.member_id
        inner = _enter_select(scope, key.label("member_id"))
    else:
        key = SyncedMember.member_id
        inner = _exit_select(scope, key.label("member_id"))
    numbered = inner.add_columns(func.row_number().over(order_by=key).label("n")).subquery()
    return list(
        session.scalars(
            select(numbered.c.member_id)
            .where(numbered.c.n % chunk_size == 0)
            .order_by(numbered.c.member_id)
        )
    )
