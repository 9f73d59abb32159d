"""Configuration aggregate: sources, destinations, audiences and the pairs that sync."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, UTCDateTime


class Source(Base):
    """A database the audience queries run against. `url` may hold `${VAR}` references,
    resolved from the environment at run time, so secrets never land here."""

    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(Text)
    statement_timeout_seconds: Mapped[float] = mapped_column(Float)


class Destination(Base):
    """Where identify calls go. `settings` keeps secrets only as `${VAR}` references."""

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    type: Mapped[str] = mapped_column(String(30))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)


class Audience(Base):
    __tablename__ = "audiences"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The trait name at the destination: fixed at creation, never reused.
    key: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    query: Mapped[str] = mapped_column(Text)
    schedule: Mapped[str] = mapped_column(String(100))
    max_exit_fraction: Mapped[float] = mapped_column(Float)
    is_archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    source: Mapped[Source] = relationship()
    links: Mapped[list["AudienceDestination"]] = relationship(back_populates="audience")


class AudienceDestination(Base):
    """One (audience, destination) pair: the unit that is scheduled, locked and synced."""

    __tablename__ = "audience_destinations"
    __table_args__ = (UniqueConstraint("audience_id", "destination_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id"))
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"))
    # False once the audience no longer lists the destination; synced state is kept.
    is_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # Destination-side id of the audience's field (Ortto REST custom field), once known.
    external_field_id: Mapped[str | None] = mapped_column(String(200))
    # Run lock: a run holds it while it works; an expired lock is free again.
    lock_owner: Mapped[str | None] = mapped_column(String(100))
    lock_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when a full run starts, cleared when one finishes: a full run that died or was
    # stopped leaves it set, and the pair's next run is full.
    is_full_sync_owed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    audience: Mapped[Audience] = relationship(back_populates="links")
    destination: Mapped[Destination] = relationship()
