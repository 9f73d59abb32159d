"""alert_channels, alert_states, alerts_sent and heartbeats (their only writer)."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models import (
    AlertChannel,
    AlertSent,
    AlertState,
    Audience,
    AudienceDestination,
    Destination,
    Heartbeat,
    SyncRun,
)
from worker.config import AlertSpec
from worker.domain import RunMode, RunStatus

# The heartbeat beat's dispatcher writes at each tick (read by the console's health check).
DISPATCHER = "dispatcher"
# Runs that count as a pair having synced (partial ones delivered all but some users).
DELIVERED = (RunStatus.SUCCEEDED, RunStatus.PARTIAL)


def save_channels(session: Session, specs: Sequence[AlertSpec]) -> None:
    """Make the channels exactly those of the file (by name)."""
    wanted = {spec.name: spec for spec in specs}
    existing = {c.name: c for c in session.scalars(select(AlertChannel))}
    for name, channel in existing.items():
        if name not in wanted:
            session.delete(channel)
    for name, spec in wanted.items():
        channel = existing.get(name) or AlertChannel(name=name)
        channel.url = spec.url
        channel.events = [str(event) for event in spec.events]
        channel.audience_keys = list(spec.audience_keys) if spec.audience_keys else None
        session.add(channel)
    session.flush()


def channels(session: Session) -> Sequence[AlertChannel]:
    return session.scalars(select(AlertChannel).order_by(AlertChannel.name)).all()


def state_of(session: Session, audience_id: int, destination_id: int) -> AlertState | None:
    return session.get(AlertState, (audience_id, destination_id), with_for_update=True)


def set_state(
    session: Session,
    audience_id: int,
    destination_id: int,
    state: str,
    *,
    run_id: int | None,
    now: datetime,
) -> None:
    row = session.get(AlertState, (audience_id, destination_id))
    if row is None:
        row = AlertState(audience_id=audience_id, destination_id=destination_id)
        session.add(row)
    row.state, row.run_id, row.changed_at = state, run_id, now
    session.flush()


def record_alert(
    session: Session,
    *,
    channel: str,
    event: str,
    audience_key: str | None,
    destination: str | None,
    run_id: int | None,
    now: datetime,
) -> int:
    """An alert about to be posted (outcome `pending`); returns its id."""
    alert = AlertSent(
        channel=channel,
        event=event,
        audience_key=audience_key,
        destination=destination,
        run_id=run_id,
        created_at=now,
        outcome="pending",
        attempts=0,
    )
    session.add(alert)
    session.flush()
    return alert.id


def finish_alert(
    session: Session,
    alert_id: int,
    *,
    outcome: str,
    attempts: int,
    response_status: int | None,
    error: str | None,
    now: datetime,
) -> None:
    session.execute(
        update(AlertSent)
        .where(AlertSent.id == alert_id)
        .values(
            outcome=outcome,
            attempts=attempts,
            response_status=response_status,
            error=error,
            finished_at=now,
        )
        .execution_options(synchronize_session=False)
    )


def alerts_sent(session: Session, *, limit: int = 100) -> Sequence[AlertSent]:
    """The latest alerts, newest first."""
    return session.scalars(select(AlertSent).order_by(AlertSent.id.desc()).limit(limit)).all()


def beat(session: Session, name: str, *, now: datetime) -> None:
    row = session.get(Heartbeat, name)
    if row is None:
        session.add(Heartbeat(name=name, beat_at=now))
    else:
        row.beat_at = now
    session.flush()


def last_beat(session: Session, name: str) -> datetime | None:
    return session.scalar(select(Heartbeat.beat_at).where(Heartbeat.name == name))


@dataclass(frozen=True, slots=True)
class PairActivity:
    """What the stale check needs of one active pair."""

    audience_id: int
    destination_id: int
    audience_key: str
    destination: str
    schedule: str
    created_at: datetime
    last_delivered_at: datetime | None  # the last succeeded or partial run's end
    state: str | None


def pair_activity(session: Session) -> list[PairActivity]:
    """Every active pair with its last delivering run and its alert state."""
    delivered = (
        select(
            SyncRun.audience_id,
            SyncRun.destination_id,
            func.max(SyncRun.finished_at).label("at"),
        )
        .where(SyncRun.status.in_(DELIVERED), SyncRun.mode != RunMode.DRY_RUN)
        .group_by(SyncRun.audience_id, SyncRun.destination_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Audience.id,
            Destination.id,
            Audience.key,
            Destination.name,
            Audience.schedule,
            Audience.created_at,
            delivered.c.at,
            AlertState.state,
        )
        .select_from(AudienceDestination)
        .join(Audience, Audience.id == AudienceDestination.audience_id)
        .join(Destination, Destination.id == AudienceDestination.destination_id)
        .outerjoin(
            delivered,
            (delivered.c.audience_id == Audience.id)
            & (delivered.c.destination_id == Destination.id),
        )
        .outerjoin(
            AlertState,
            (AlertState.audience_id == Audience.id) & (AlertState.destination_id == Destination.id),
        )
        .where(AudienceDestination.is_enabled.is_(True), Audience.is_archived.is_(False))
        .order_by(Audience.key, Destination.name)
    ).all()
    return [PairActivity(*row) for row in rows]
