"""Observability aggregate: alert channels, each pair's alert state, the alerts sent, and
the heartbeats of the service's processes (beat's dispatcher)."""

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime
from models.sync import SyncRun

BigId = BigInteger().with_variant(Integer, "sqlite")


class AlertChannel(Base):
    """A webhook from the `alerts:` section. `url` keeps `${VAR}` references, resolved
    when an alert is sent, so the secret never lands here."""

    __tablename__ = "alert_channels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(Text)
    # The events it wants (worker.alerts.AlertEvent values).
    events: Mapped[list[str]] = mapped_column(JSON)
    # Audience keys it is limited to (None: every audience).
    audience_keys: Mapped[list[str] | None] = mapped_column(JSON)


class AlertState(Base):
    """What alerts last said of one (audience, destination) pair: an alert goes out only
    when this changes."""

    __tablename__ = "alert_states"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), primary_key=True
    )
    # ok, failed, blocked, partial or stale.
    state: Mapped[str] = mapped_column(String(20))
    run_id: Mapped[int | None] = mapped_column(BigId)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AlertSent(Base):
    """One alert to one channel: recorded before it is posted, updated with the outcome."""

    __tablename__ = "alerts_sent"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    channel: Mapped[str] = mapped_column(String(100))
    event: Mapped[str] = mapped_column(String(20))
    audience_key: Mapped[str | None] = mapped_column(String(200))
    destination: Mapped[str | None] = mapped_column(String(100))
    run_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # pending, delivered or failed.
    outcome: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    response_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Heartbeat(Base):
    """When a named process last did its work (beat's dispatcher: each tick)."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime())


# Metrics read each pair's runs by status (counts, last success) at every scrape.
Index(
    "ix_sync_runs_pair_status",
    SyncRun.audience_id,
    SyncRun.destination_id,
    SyncRun.status,
    SyncRun.id,
)
Index("ix_alerts_sent_created", AlertSent.created_at)
