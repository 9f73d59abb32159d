"""The diff: set-based anti-joins between a snapshot and a destination's synced state.

Changes are read page by page in member_id order (keyset pagination), so neither side is
ever loaded whole into Python and a page's writes never disturb the pages after it.
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, false, func, literal, or_, select, true
from sqlalchemy.orm import Session

from models import FailingMember, SnapshotMember, SyncedMember
from worker.payloads import Change

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
            or_(SyncedMember.is_member.is_(None), SyncedMember.is_member == false())
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
            SyncedMember.is_member.is_(True),
            ~in_snapshot,
        )
        .where(_not_quarantined(scope, SyncedMember.member_id))
    )


def count_changes(session: Session, scope: PairScope) -> tuple[int, int]:
    """(users to send `true`, users to send `false`)."""
    enter = session.scalar(_enter_select(scope, func.count())) or 0
    leave = session.scalar(_exit_select(scope, func.count())) or 0
    return enter, leave


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
