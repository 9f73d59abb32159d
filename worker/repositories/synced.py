"""synced_members: the last value each destination accepted for each user (its only writer)."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import and_, false, func, literal, select, text
from sqlalchemy.orm import Session

from models import RunChange, SyncedMember, SyncRun
from worker.payloads import Change
from worker.repositories.dialect import insert_for, is_postgresql

_KEY = ["audience_id", "destination_id", "member_id"]
_COLUMNS = [*_KEY, "is_anonymous", "is_member", "email", "run_id", "anonymous_id"]

# One statement for a whole page on PostgreSQL: arrays in, unnest, upsert.
_UPSERT_PAGE = text(
    "INSERT INTO synced_members (audience_id, destination_id, member_id, "
    "is_anonymous, is_member, email, run_id, anonymous_id) "
    "SELECT :audience_id, :destination_id, m, a, v, e, :run_id, o "
    "FROM unnest(CAST(:ids AS text[]), CAST(:anons AS boolean[]), "
    "CAST(:values AS boolean[]), CAST(:emails AS text[]), CAST(:others AS text[])) "
    "AS t(m, a, v, e, o) "
    "ON CONFLICT (audience_id, destination_id, member_id) DO UPDATE SET "
    "is_member = excluded.is_member, is_anonymous = excluded.is_anonymous, "
    "email = excluded.email, run_id = excluded.run_id, anonymous_id = excluded.anonymous_id"
)


def record_accepted(
    session: Session,
    *,
    audience_id: int,
    destination_id: int,
    run_id: int,
    changes: Sequence[Change],
    now: datetime,
) -> None:
    """Move the synced state of users whose calls the destination accepted (one upsert)."""
    if not changes:
        return
    if is_postgresql(session):
        session.execute(
            _UPSERT_PAGE,
            {
                "audience_id": audience_id,
                "destination_id": destination_id,
                "run_id": run_id,
                "ids": [c.member_id for c in changes],
                "anons": [c.is_anonymous for c in changes],
                "values": [c.value for c in changes],
                "emails": [c.email for c in changes],
                "others": [c.anonymous_id for c in changes],
            },
        )
        return
    statement = insert_for(session, SyncedMember.__table__)  # type: ignore[arg-type]
    statement = statement.on_conflict_do_update(
        index_elements=_KEY,
        set_={
            name: getattr(statement.excluded, name)
            for name in ("is_member", "is_anonymous", "email", "run_id", "anonymous_id")
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
                "anonymous_id": change.anonymous_id,
                "run_id": run_id,
            }
            for change in changes
        ],
    )


def add_unrecorded_entrants(
    session: Session, run_id: int, audience_id: int, destination_id: int, *, now: datetime
) -> None:
    """For a run that stopped: a user it may have told `true` for the first time, unrecorded,
    gets a synced row saying `false`, so that an exit reaches them should the source drop
    them before the destination's value is known again."""
    session.execute(
        insert_for(session, SyncedMember.__table__)  # type: ignore[arg-type]
        .from_select(
            _COLUMNS,
            select(
                literal(audience_id),
                literal(destination_id),
                RunChange.member_id,
                RunChange.is_anonymous,
                false(),
                RunChange.email,
                literal(None),
                RunChange.anonymous_id,
            ).where(
                and_(RunChange.run_id == run_id, RunChange.is_in_flight.is_(True)),
                RunChange.value.is_(True),
            ),
        )
        .on_conflict_do_nothing()
    )


def count_members(session: Session, audience_id: int, destination_id: int) -> int:
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


def has_state(session: Session, audience_id: int, destination_id: int) -> bool:
    """Whether the destination was ever told anything about this audience."""
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


@dataclass(frozen=True, slots=True)
class SyncedState:
    """What a destination last accepted for one user, and when (the recording run's end,
    or its start while it runs; None for a user held as `false` after a run that stopped)."""

    is_member: bool
    run_id: int | None
    updated_at: datetime | None


def member_state(
    session: Session, audience_id: int, destination_id: int, member_id: str
) -> SyncedState | None:
    """What the destination last accepted for the user (None: never told)."""
    row = session.execute(
        select(
            SyncedMember.is_member,
            SyncedMember.run_id,
            func.coalesce(SyncRun.finished_at, SyncRun.started_at),
        )
        .outerjoin(SyncRun, SyncRun.id == SyncedMember.run_id)
        .where(
            SyncedMember.audience_id == audience_id,
            SyncedMember.destination_id == destination_id,
            SyncedMember.member_id == member_id,
        )
    ).first()
    if row is None:
        return None
    return SyncedState(bool(row[0]), row[1], _aware(row[2]))


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes from an expression; they are UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def member_states(
    session: Session, audience_ids: Sequence[int], member_id: str
) -> dict[tuple[int, int], SyncedState]:
    """`member_state` of every pair of the given audiences at once, keyed by (audience id,
    destination id); a pair that never told the user is absent. One statement on the
    synced_members key (audience_id, destination_id, member_id)."""
    if not audience_ids:
        return {}
    rows = session.execute(
        select(
            SyncedMember.audience_id,
            SyncedMember.destination_id,
            SyncedMember.is_member,
            SyncedMember.run_id,
            func.coalesce(SyncRun.finished_at, SyncRun.started_at),
        )
        .outerjoin(SyncRun, SyncRun.id == SyncedMember.run_id)
        .where(SyncedMember.audience_id.in_(audience_ids), SyncedMember.member_id == member_id)
    )
    return {
        (int(audience_id), int(destination_id)): SyncedState(bool(value), run_id, _aware(at))
        for audience_id, destination_id, value, run_id, at in rows
    }
