"""Queries on sources, destinations, audiences and their pairs (including the run lock)."""

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, joinedload

from models import Audience, AudienceDestination, Destination, Source
from worker.config import DestinationSpec, SourceSpec


def sources_by_name(session: Session) -> dict[str, Source]:
    return {s.name: s for s in session.scalars(select(Source))}


def destinations_by_name(session: Session) -> dict[str, Destination]:
    return {d.name: d for d in session.scalars(select(Destination))}


def all_audiences(session: Session) -> Sequence[Audience]:
    return (
        session.scalars(
            select(Audience)
            .options(joinedload(Audience.source), joinedload(Audience.links))
            .order_by(Audience.key)
        )
        .unique()
        .all()
    )


def audience_by_key(session: Session, key: str) -> Audience | None:
    return session.scalar(select(Audience).where(Audience.key == key))


def destination_by_name(session: Session, name: str) -> Destination | None:
    return session.scalar(select(Destination).where(Destination.name == name))


def pairs(
    session: Session,
    *,
    audience_keys: Sequence[str] | None = None,
    destination_name: str | None = None,
    include_archived: bool = False,
) -> Sequence[AudienceDestination]:
    """Enabled (audience, destination) pairs, optionally narrowed."""
    query = (
        select(AudienceDestination)
        .join(Audience)
        .join(Destination)
        .options(
            joinedload(AudienceDestination.audience).joinedload(Audience.source),
            joinedload(AudienceDestination.destination),
        )
        .where(AudienceDestination.is_enabled.is_(True))
        .order_by(Audience.key, Destination.name)
    )
    if not include_archived:
        query = query.where(Audience.is_archived.is_(False))
    if audience_keys is not None:
        query = query.where(Audience.key.in_(audience_keys))
    if destination_name is not None:
        query = query.where(Destination.name == destination_name)
    return session.scalars(query).all()


def pair_by_id(session: Session, pair_id: int) -> AudienceDestination | None:
    return session.scalar(
        select(AudienceDestination)
        .options(
            joinedload(AudienceDestination.audience).joinedload(Audience.source),
            joinedload(AudienceDestination.destination),
        )
        .where(AudienceDestination.id == pair_id)
    )


def try_lock_pair(
    session: Session, pair_id: int, owner: str, *, now: datetime, ttl: timedelta
) -> bool:
    """Take the pair's run lock if it is free or expired (one atomic UPDATE)."""
    result = session.execute(
        update(AudienceDestination)
        .where(
            AudienceDestination.id == pair_id,
            or_(
                AudienceDestination.lock_owner.is_(None),
                AudienceDestination.lock_expires_at < now,
                AudienceDestination.lock_owner == owner,
            ),
        )
        .values(lock_owner=owner, lock_expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def extend_lock(
    session: Session, pair_id: int, owner: str, *, now: datetime, ttl: timedelta
) -> bool:
    result = session.execute(
        update(AudienceDestination)
        .where(AudienceDestination.id == pair_id, AudienceDestination.lock_owner == owner)
        .values(lock_expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def holds_lock(session: Session, pair_id: int, owner: str) -> bool:
    """Whether `owner` still holds the pair's lock (nobody took it over after it expired)."""
    holder = session.scalar(
        select(AudienceDestination.lock_owner).where(AudienceDestination.id == pair_id)
    )
    return holder == owner


def hand_over_lock(session: Session, pair_id: int, holder: str, new_holder: str) -> None:
    """Rename the lock's owner (a run takes over the lock its caller acquired)."""
    session.execute(
        update(AudienceDestination)
        .where(AudienceDestination.id == pair_id, AudienceDestination.lock_owner == holder)
        .values(lock_owner=new_holder)
        .execution_options(synchronize_session=False)
    )


def release_lock(session: Session, pair_id: int, owner: str) -> None:
    session.execute(
        update(AudienceDestination)
        .where(AudienceDestination.id == pair_id, AudienceDestination.lock_owner == owner)
        .values(lock_owner=None, lock_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def set_field_id(session: Session, pair_id: int, field_id: str | None) -> None:
    session.execute(
        update(AudienceDestination)
        .where(AudienceDestination.id == pair_id)
        .values(external_field_id=field_id)
        .execution_options(synchronize_session=False)
    )


def names_of_pair(session: Session, audience_id: int, destination_id: int) -> tuple[str, str]:
    """(audience key, destination name)."""
    audience = session.get(Audience, audience_id)
    destination = session.get(Destination, destination_id)
    assert audience is not None and destination is not None
    return audience.key, destination.name


def destination_settings(session: Session, destination_id: int) -> tuple[str, dict[str, Any]]:
    """(name, stored settings) of a destination."""
    destination = session.get(Destination, destination_id)
    if destination is None:
        raise LookupError(f"no destination with id {destination_id}")
    return destination.name, dict(destination.settings)


def save_sources(session: Session, specs: Sequence[SourceSpec]) -> dict[str, Source]:
    """Create or update each source; every source by name (those not in `specs` too)."""
    known = sources_by_name(session)
    for spec in specs:
        source = known.setdefault(spec.name, Source(name=spec.name))
        source.url = spec.url
        source.statement_timeout_seconds = spec.statement_timeout_seconds
        session.add(source)
    session.flush()
    return known


def save_destinations(session: Session, specs: Sequence[DestinationSpec]) -> dict[str, Destination]:
    """Create or update each destination; every destination by name."""
    known = destinations_by_name(session)
    for spec in specs:
        destination = known.setdefault(spec.name, Destination(name=spec.name))
        destination.type, destination.settings = spec.type, spec.settings
        session.add(destination)
    session.flush()
    return known


def create_audience(session: Session, *, key: str, now: datetime, **values: Any) -> Audience:
    audience = Audience(key=key, created_at=now, updated_at=now, **values)
    session.add(audience)
    session.flush()
    return audience


def update_audience(session: Session, audience: Audience, *, now: datetime, **values: Any) -> bool:
    """Set the audience's values; whether any of them changed."""
    if all(getattr(audience, name) == value for name, value in values.items()):
        return False
    for name, value in values.items():
        setattr(audience, name, value)
    audience.updated_at = now
    session.flush()
    return True


def set_destinations(session: Session, audience: Audience, destination_ids: set[int]) -> None:
    """Enable exactly these destinations for the audience (links to others are disabled)."""
    links = {link.destination_id: link for link in audience.links}
    for destination_id in destination_ids - links.keys():
        session.add(
            AudienceDestination(
                audience_id=audience.id, destination_id=destination_id, is_enabled=True
            )
        )
    for destination_id, link in links.items():
        link.is_enabled = destination_id in destination_ids


def archive_audience(session: Session, audience: Audience, *, now: datetime) -> bool:
    """Mark the audience archived; whether it was active."""
    if audience.is_archived:
        return False
    audience.is_archived = True
    audience.updated_at = now
    return True


def set_full_sync_owed(session: Session, pair_id: int, *, is_owed: bool) -> None:
    """Note that the pair owes a full sync (a full run started) or no longer does (a full
    run finished)."""
    session.execute(
        update(AudienceDestination)
        .where(AudienceDestination.id == pair_id)
        .values(is_full_sync_owed=is_owed)
        .execution_options(synchronize_session=False)
    )


def pair_of(session: Session, audience_id: int, destination_id: int) -> AudienceDestination | None:
    return session.scalar(
        select(AudienceDestination).where(
            AudienceDestination.audience_id == audience_id,
            AudienceDestination.destination_id == destination_id,
        )
    )
