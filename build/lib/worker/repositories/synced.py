"""synced_members: the last value each destination accepted for each user (its only writer)."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, false, func, literal, select, text
from sqlalchemy.orm import Session

from models import RunChange, SyncedMember
from worker.payloads import Change
from worker.repositories.dialect import insert_for, is_postgresql

_KEY = ["audience_id", "destination_id", "member_id"]
_COLUMNS = [*_KEY, "is_anonymous", "is_member", "email", "updated_at", "run_id"]

# One statement for a whole page on PostgreSQL: arrays in, unnest, upsert.
_UPSERT_PAGE = text(
    "INSERT INTO synced_members (audience_id, destination_id, member_id, "
    "is_anonymous, is_member, email, updated_at, run_id) "
    "SELECT :audience_id, :destination_id, m, a, v, e, :now, :run_id "
    "FROM unnest(CAST(:ids AS text[]), CAST(:anons AS boolean[]), "
    "CAST(:values AS boolean[]), CAST(:emails AS text[])) AS t(m, a, v, e) "
    "ON CONFLICT (audience_id, destination_id, member_id) DO UPDATE SET "
    "is_member = excluded.is_member, is_anonymous = excluded.is_anonymous, "
    "email = excluded.email, updated_at = excluded.updated_at, "
    "run_id = excluded.run_id"
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
                "now": now,
                "run_id": run_id,
                "ids": [c.member_id for c in changes],
                "anons": [c.is_anonymous for c in changes],
                "values": [c.value for c in changes],
                "emails": [c.email for c in changes],
            },
        )
        return
    statement = insert_for(session, SyncedMember.__table__)  # type: ignore[arg-type]
    statement = statement.on_conflict_do_update(
        index_elements=_KEY,
        set_={
            name: getattr(statement.excluded, name)
            for name in ("is_member", "is_anonymous", "email", "updated_at", "run_id")
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
                literal(now, SyncedMember.updated_at.type),
                literal(None),
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


def refresh_statistics(session: Session) -> None:
    """After a large run on PostgreSQL: fresh statistics keep the next diff's plan right."""
    if is_postgresql(session):
        session.execute(text("ANALYZE synced_members"))


def member_state(
    session: Session, audience_id: int, destination_id: int, member_id: str
) -> SyncedMember | None:
    """What the destination last accepted for the user (None: never told)."""
    return session.get(SyncedMember, (audience_id, destination_id, member_id))
