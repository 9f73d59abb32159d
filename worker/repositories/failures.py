"""failing_members and delivery_failures: rejections, quarantine and users in doubt (their
only writer)."""

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, exists, false, func, literal, select, update
from sqlalchemy.orm import Session

from models import (
    Audience,
    AudienceMember,
    DeliveryFailure,
    Destination,
    FailingMember,
    RunChange,
    SyncedMember,
)
from worker.domain import PairScope
from worker.payloads import Change
from worker.repositories.dialect import insert_for

# Longest rejection message stored; destinations may answer with whole documents.
MESSAGE_MAX_CHARS = 2000
# Accepted re-sends owed to a user in doubt: a request whose answer was lost may still be
# applied by the destination after the first re-send, and the second one puts it right.
IN_DOUBT_RESENDS = 2

_KEY = ["audience_id", "destination_id", "member_id"]


def truncate_message(message: str) -> str:
    return message[:MESSAGE_MAX_CHARS]


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
                "message": truncate_message(message),
            }
            for change, status, message in rejected
        ],
    )
    statement = insert_for(session, FailingMember.__table__)  # type: ignore[arg-type]
    count = FailingMember.consecutive_failures + 1
    statement = statement.on_conflict_do_update(
        index_elements=_KEY,
        set_={
            "consecutive_failures": count,
            "is_quarantined": count >= quarantine_after,
            **{
                name: getattr(statement.excluded, name)
                for name in (
                    "last_value",
                    "last_status",
                    "last_message",
                    "last_run_id",
                    "updated_at",
                )
            },
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
                "last_message": truncate_message(message),
                "last_run_id": run_id,
                "updated_at": now,
                "resends_owed": 1,
            }
            for change, status, message in rejected
        ],
    )


def settle_accepted(
    session: Session, audience_id: int, destination_id: int, member_ids: Sequence[str]
) -> None:
    """The destination accepted these users' current value: a user owed no more re-sends
    leaves the failing rows; a user in doubt owed another keeps its row for the next run."""
    if not member_ids:
        return
    of_users = (
        FailingMember.audience_id == audience_id,
        FailingMember.destination_id == destination_id,
        FailingMember.member_id.in_(member_ids),
    )
    session.execute(delete(FailingMember).where(*of_users, FailingMember.resends_owed <= 1))
    session.execute(
        update(FailingMember)
        .where(*of_users)
        .values(resends_owed=FailingMember.resends_owed - 1, consecutive_failures=0)
        .execution_options(synchronize_session=False)
    )


def mark_in_doubt(
    session: Session, run_id: int, audience_id: int, destination_id: int, *, now: datetime
) -> None:
    """The users of the run's pages in flight may have been told something unrecorded: they
    become in doubt, owed their current value on the next IN_DOUBT_RESENDS deliveries."""
    message = f"in doubt: run {run_id} stopped before recording the destination's answer"
    statement = insert_for(session, FailingMember.__table__)  # type: ignore[arg-type]
    statement = statement.from_select(
        [
            *_KEY,
            "consecutive_failures",
            "is_quarantined",
            "last_value",
            "last_status",
            "last_message",
            "last_run_id",
            "updated_at",
            "resends_owed",
        ],
        select(
            literal(audience_id),
            literal(destination_id),
            RunChange.member_id,
            literal(0),
            false(),
            RunChange.value,
            literal(None),
            literal(message),
            literal(run_id),
            literal(now, FailingMember.updated_at.type),
            literal(IN_DOUBT_RESENDS),
        ).where(RunChange.run_id == run_id, RunChange.is_in_flight.is_(True)),
    )
    # A user already failing keeps its history; it is owed the full count of re-sends again.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=_KEY, set_={"resends_owed": IN_DOUBT_RESENDS}
        )
    )


def forget_moot(session: Session, scope: PairScope) -> None:
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
                AudienceMember.audience_id == scope.audience_id,
                AudienceMember.member_id == FailingMember.member_id,
            ),
        )
    )


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


def count_failures_of_run(session: Session, run_id: int) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(DeliveryFailure)
            .where(DeliveryFailure.run_id == run_id)
        )
        or 0
    )


def failures_of_run(
    session: Session, run_id: int, *, limit: int = 1000
) -> Sequence[DeliveryFailure]:
    return session.scalars(
        select(DeliveryFailure)
        .where(DeliveryFailure.run_id == run_id)
        .order_by(DeliveryFailure.id)
        .limit(limit)
    ).all()


def failing_member(
    session: Session, audience_id: int, destination_id: int, member_id: str
) -> FailingMember | None:
    """The user's failing row for the pair: rejected, quarantined or in doubt (or None)."""
    return session.get(FailingMember, (audience_id, destination_id, member_id))


def failing_member_of_pairs(
    session: Session, audience_ids: Sequence[int], member_id: str
) -> dict[tuple[int, int], FailingMember]:
    """`failing_member` of every pair of the given audiences at once, keyed by (audience
    id, destination id). One statement on the failing_members key (audience_id,
    destination_id, member_id)."""
    if not audience_ids:
        return {}
    return {
        (row.audience_id, row.destination_id): row
        for row in session.scalars(
            select(FailingMember).where(
                FailingMember.audience_id.in_(audience_ids), FailingMember.member_id == member_id
            )
        )
    }
