"""The diff: set-based anti-joins between a snapshot's staging table and a destination's
synced state.

When a run starts, its change set is computed once, in SQL, into `run_changes`; delivery
then reads it page by page in member_id order (keyset pagination), so neither side is ever
loaded whole into Python, a page costs the same however large the audience, and parallel
workers can take disjoint member_id ranges of one run.
"""

from typing import Any, NamedTuple

from sqlalchemy import and_, delete, exists, false, func, literal, select, text, true, update
from sqlalchemy.orm import Session

from models import FailingMember, RunChange, SyncedMember, SyncRun
from worker.domain import PairScope
from worker.payloads import Change
from worker.repositories import synced as synced_repo
from worker.repositories.dialect import is_postgresql, tune_for_whole_audience
from worker.repositories.snapshots import staged, staging_name

_CHANGE_COLUMNS = [
    "run_id",
    "member_id",
    "is_anonymous",
    "email",
    "value",
    "previous_run_id",
    "is_in_flight",
    "anonymous_id",
]


def _pair(scope: PairScope, table: Any) -> Any:
    return and_(
        table.audience_id == scope.audience_id, table.destination_id == scope.destination_id
    )


def _failing(scope: PairScope, member_id: Any, *, is_quarantined: bool) -> Any:
    """A failing row for the user: its last call was rejected, or a run that stopped may
    have sent it one it never recorded. The destination's value is then not known, so the
    user gets its current value; quarantined users get nothing until released."""
    return exists().where(
        _pair(scope, FailingMember),
        FailingMember.member_id == member_id,
        FailingMember.is_quarantined.is_(is_quarantined),
    )


def _in_snapshot(scope: PairScope, member_id: Any) -> Any:
    stage = staged(scope.snapshot_id)
    return exists().where(stage.c.member_id == member_id)


def _held_as_member(scope: PairScope, member_id: Any) -> Any:
    return exists().where(
        _pair(scope, SyncedMember),
        SyncedMember.member_id == member_id,
        SyncedMember.is_member.is_(True),
    )


def _change_selects(scope: PairScope, run_id: int, *, has_failing: bool = True) -> list[Any]:
    """The run's changes as run_changes rows, in up to four selects. Each is a plain join or
    anti-join (every NOT EXISTS stands alone in the WHERE clause), so the database plans
    them as hash anti-joins over the whole audience. A pair without failing users (the
    usual case) needs two: who entered, who left."""
    run = literal(run_id)
    snapshot = staged(scope.snapshot_id).c
    previous_run = (
        select(SyncedMember.run_id)
        .where(_pair(scope, SyncedMember), SyncedMember.member_id == snapshot.member_id)
        .scalar_subquery()
    )
    not_quarantined_member = (
        ~_failing(scope, snapshot.member_id, is_quarantined=True) if has_failing else true()
    )
    not_quarantined_synced = (
        ~_failing(scope, SyncedMember.member_id, is_quarantined=True) if has_failing else true()
    )
    enter = select(
        run,
        snapshot.member_id,
        snapshot.is_anonymous,
        snapshot.email,
        true(),
        previous_run,
        false(),
        snapshot.anonymous_id,
    ).where(not_quarantined_member)
    synced_columns = (
        run,
        SyncedMember.member_id,
        SyncedMember.is_anonymous,
        SyncedMember.email,
        false(),
        SyncedMember.run_id,
        false(),
        SyncedMember.anonymous_id,
    )
    leave = select(*synced_columns).where(
        _pair(scope, SyncedMember),
        SyncedMember.is_member.is_(True),
        ~_in_snapshot(scope, SyncedMember.member_id),
        not_quarantined_synced,
    )
    # Users in doubt whose synced state already agrees with the source get it again.
    leave_in_doubt = select(*synced_columns).where(
        _pair(scope, SyncedMember),
        SyncedMember.is_member.is_(False),
        _failing(scope, SyncedMember.member_id, is_quarantined=False),
        ~_in_snapshot(scope, SyncedMember.member_id),
    )
    if not has_failing:
        return [
            enter if scope.is_full else enter.where(~_held_as_member(scope, snapshot.member_id)),
            leave,
        ]
    if scope.is_full:
        return [enter, leave, leave_in_doubt]
    enter_in_doubt = (
        select(
            run,
            snapshot.member_id,
            snapshot.is_anonymous,
            snapshot.email,
            true(),
            SyncedMember.run_id,
            false(),
            snapshot.anonymous_id,
        )
        .join(
            SyncedMember,
            and_(_pair(scope, SyncedMember), SyncedMember.member_id == snapshot.member_id),
        )
        .where(
            SyncedMember.is_member.is_(True),
            _failing(scope, snapshot.member_id, is_quarantined=False),
        )
    )
    enter_new = enter.where(~_held_as_member(scope, snapshot.member_id))
    return [enter_new, enter_in_doubt, leave, leave_in_doubt]


class PlannedChanges(NamedTuple):
    to_enter: int  # users to send `true`
    to_exit: int  # users to send `false`
    held: int  # users the destination holds as members before the run


def plan_run_changes(
    session: Session, scope: PairScope, run_id: int, *, members: int | None = None
) -> PlannedChanges:
    """Write the run's change set into run_changes and count it. `members`, the snapshot's
    member count when the caller knows it, spares counting the held members."""
    tune_for_whole_audience(session)
    has_failing = session.scalar(select(literal(1)).where(_pair(scope, FailingMember)).limit(1))
    is_one_pass = is_postgresql(session) and has_failing is None and not scope.is_full
    if is_one_pass:
        _plan_in_one_pass(session, scope, run_id)
    else:
        _plan_by_selects(session, scope, run_id, has_failing=has_failing is not None)
    counts = dict(
        session.execute(
            select(RunChange.value, func.count())
            .where(RunChange.run_id == run_id)
            .group_by(RunChange.value)
        ).all()
    )
    to_enter, to_exit = counts.get(True, 0), counts.get(False, 0)
    if is_one_pass and members is not None:
        # One pass planned every member not held as one to enter and every held member
        # gone to exit, so the held members are the snapshot's, less those, plus these.
        held = members - to_enter + to_exit
    else:
        held = synced_repo.count_members(session, scope.audience_id, scope.destination_id)
    return PlannedChanges(to_enter, to_exit, held)


def _plan_by_selects(session: Session, scope: PairScope, run_id: int, *, has_failing: bool) -> None:
    """Any backend, any run: the selects of `_change_selects`, one INSERT each."""
    table: Any = RunChange.__table__
    for query in _change_selects(scope, run_id, has_failing=has_failing):
        session.execute(table.insert().from_select(_CHANGE_COLUMNS, query))


def _plan_in_one_pass(session: Session, scope: PairScope, run_id: int) -> None:
    """PostgreSQL, an incremental run of a pair without failing users (the usual case): the
    two selects of `_change_selects` as one full join of the staging table with the pair's
    synced state, a single pass over both. Members the destination does not hold as
    members get `true`; users it holds as members who are no longer in the snapshot get
    `false`; each carries the run that recorded its previous value."""
    columns = ", ".join(_CHANGE_COLUMNS)
    session.execute(
        text(
            f"INSERT INTO run_changes ({columns}) SELECT :run_id, "
            "coalesce(s.member_id, m.member_id), "
            "CASE WHEN s.member_id IS NULL THEN m.is_anonymous ELSE s.is_anonymous END, "
            "CASE WHEN s.member_id IS NULL THEN m.email ELSE s.email END, "
            "s.member_id IS NOT NULL, m.run_id, false, "
            "CASE WHEN s.member_id IS NULL THEN m.anonymous_id ELSE s.anonymous_id END "
            f"FROM {staging_name(scope.snapshot_id)} AS s FULL JOIN (SELECT member_id, "
            "is_member, is_anonymous, email, run_id, anonymous_id FROM synced_members "
            "WHERE audience_id = :audience_id AND destination_id = :destination_id) AS m "
            "ON m.member_id = s.member_id "
            "WHERE (s.member_id IS NOT NULL AND m.is_member IS NOT TRUE) "
            "OR (s.member_id IS NULL AND m.is_member)"
        ),
        {
            "run_id": run_id,
            "audience_id": scope.audience_id,
            "destination_id": scope.destination_id,
        },
    )


def page_of_changes(
    session: Session, run_id: int, *, after: str | None, upto: str | None, limit: int
) -> list[Change]:
    """The run's next `limit` undelivered changes with member_id in (after, upto], in order."""
    query = select(
        RunChange.member_id,
        RunChange.is_anonymous,
        RunChange.email,
        RunChange.value,
        RunChange.previous_run_id,
        RunChange.anonymous_id,
    ).where(RunChange.run_id == run_id)
    if after is not None:
        query = query.where(RunChange.member_id > after)
    if upto is not None:
        query = query.where(RunChange.member_id <= upto)
    rows = session.execute(query.order_by(RunChange.member_id).limit(limit)).all()
    return [Change(r[0], bool(r[1]), r[2], bool(r[3]), r[4], anonymous_id=r[5]) for r in rows]


def _in_range(run_id: int, first: str | None, last: str | None) -> list[Any]:
    conditions = [RunChange.run_id == run_id]
    if first is not None:
        conditions.append(RunChange.member_id >= first)
    if last is not None:
        conditions.append(RunChange.member_id <= last)
    return conditions


def mark_in_flight(session: Session, run_id: int, first: str, last: str) -> None:
    """Note that a page is about to be sent: from here until it is recorded, a crash leaves
    its users in doubt."""
    session.execute(
        update(RunChange)
        .where(*_in_range(run_id, first, last))
        .values(is_in_flight=True)
        .execution_options(synchronize_session=False)
    )


def drop_changes(
    session: Session, run_id: int, first: str | None = None, last: str | None = None
) -> None:
    """Forget the run's changes in [first, last] (all of them without bounds)."""
    session.execute(delete(RunChange).where(*_in_range(run_id, first, last)))


def chunk_boundaries(session: Session, run_id: int, *, chunk_size: int) -> list[str]:
    """Member ids that cut the run's changes into chunks of `chunk_size` (for fan-out):
    chunk i covers (boundary[i-1], boundary[i]]; the last chunk is open-ended."""
    numbered = (
        select(
            RunChange.member_id,
            func.row_number().over(order_by=RunChange.member_id).label("n"),
        )
        .where(RunChange.run_id == run_id)
        .subquery()
    )
    return list(
        session.scalars(
            select(numbered.c.member_id)
            .where(numbered.c.n % chunk_size == 0)
            .order_by(numbered.c.member_id)
        )
    )


def runs_with_changes(session: Session, audience_id: int, destination_id: int) -> list[int]:
    """Runs of the pair that left changes behind (they stopped before delivering them all)."""
    return list(
        session.scalars(
            select(SyncRun.id)
            .where(
                SyncRun.audience_id == audience_id,
                SyncRun.destination_id == destination_id,
                exists().where(RunChange.run_id == SyncRun.id),
            )
            .order_by(SyncRun.id)
        )
    )


def count_member_exits(session: Session, scope: PairScope) -> int:
    """Users to send `false` whom the destination holds as members (users in doubt aside)."""
    query = select(func.count()).where(
        _pair(scope, SyncedMember),
        SyncedMember.is_member.is_(True),
        ~_in_snapshot(scope, SyncedMember.member_id),
        ~_failing(scope, SyncedMember.member_id, is_quarantined=True),
    )
    return session.scalar(query) or 0


def count_newly_entered(session: Session, scope: PairScope) -> int:
    """Members not yet `true` at the destination (what a full sync would also count)."""
    stage = staged(scope.snapshot_id)
    snapshot = stage.c
    query = (
        select(func.count())
        .select_from(stage)
        .where(
            ~_held_as_member(scope, snapshot.member_id),
            ~_failing(scope, snapshot.member_id, is_quarantined=True),
        )
    )
    return session.scalar(query) or 0
