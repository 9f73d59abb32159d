"""Sync aggregate: what each destination was last told, the runs, and per-user failures."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime

BigId = BigInteger().with_variant(Integer, "sqlite")


class SyncedMember(Base):
    """The last membership value a destination accepted for one user of one audience."""

    __tablename__ = "synced_members"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    is_anonymous: Mapped[bool] = mapped_column(Boolean, default=False)
    is_member: Mapped[bool] = mapped_column(Boolean)
    # The email last sent, so an exit can be addressed by email (Ortto merge_by str::email).
    email: Mapped[str | None] = mapped_column(String(255))
    # The anonymous id last sent with the user id, so an exit carries both ids too.
    anonymous_id: Mapped[str | None] = mapped_column(String(255))
    # The run that recorded the value (None: held as `false` after a run that stopped).
    run_id: Mapped[int | None] = mapped_column(BigId)


class SyncRun(Base):
    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id", ondelete="CASCADE"))
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id", ondelete="CASCADE"))
    # The values of worker.domain's RunMode, Trigger and RunStatus.
    mode: Mapped[str] = mapped_column(String(20))
    trigger: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    snapshot_id: Mapped[int | None] = mapped_column(BigId)
    members: Mapped[int] = mapped_column(Integer, default=0)
    entered: Mapped[int] = mapped_column(Integer, default=0)
    exited: Mapped[int] = mapped_column(Integer, default=0)
    sent: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # reason -> count, e.g. {"null_id": 3, "id_too_long": 1, "invalid_id": 1, "duplicate_id": 2}
    skipped_rows: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    # Where the run runs: `status` tells a live run from a dead one by these.
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(String(255))
    # Set by `runs cancel`: the run stops at its next page boundary.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Timings per phase (None: the run did not reach the phase). Delivery is timed from
    # `delivery_started_at` to the run's end, whichever process ends it (a fan-out's last
    # chunk included).
    snapshot_seconds: Mapped[float | None] = mapped_column(Float)
    diff_seconds: Mapped[float | None] = mapped_column(Float)
    delivery_seconds: Mapped[float | None] = mapped_column(Float)
    delivery_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RunChange(Base):
    """One change a run is to deliver, computed set-based when the run starts. Rows leave
    as their page is recorded; what a dead run leaves marked `is_in_flight` may have reached
    the destination unrecorded, and is settled by the next run."""

    __tablename__ = "run_changes"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("sync_runs.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    is_anonymous: Mapped[bool] = mapped_column(Boolean)
    email: Mapped[str | None] = mapped_column(String(255))
    value: Mapped[bool] = mapped_column(Boolean)
    # The run that recorded the destination's current value (None: never told).
    previous_run_id: Mapped[int | None] = mapped_column(BigId)
    is_in_flight: Mapped[bool] = mapped_column(Boolean, default=False)
    # The anonymous id that travels with the user id, when the member has both.
    anonymous_id: Mapped[str | None] = mapped_column(String(255))


class DeliveryFailure(Base):
    """One user's rejected call in one run (history; never updated)."""

    __tablename__ = "delivery_failures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("sync_runs.id", ondelete="CASCADE"))
    member_id: Mapped[str] = mapped_column(String(255))
    value: Mapped[bool] = mapped_column(Boolean)
    status: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)


class FailingMember(Base):
    """A user whose latest delivery was rejected (quarantined after repeated rejections) or
    is in doubt (a run stopped before recording the destination's answer)."""

    __tablename__ = "failing_members"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    destination_id: Mapped[int] = mapped_column(
        ForeignKey("destinations.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    consecutive_failures: Mapped[int] = mapped_column(Integer)
    is_quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    last_value: Mapped[bool] = mapped_column(Boolean)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_message: Mapped[str] = mapped_column(Text)
    last_run_id: Mapped[int] = mapped_column(BigId)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Accepted deliveries of the user's current value still owed before the row goes: one
    # after a rejection; two for a user in doubt, since a lost request may still be applied
    # by the destination after the first re-send.
    resends_owed: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


Index("ix_sync_runs_pair_started", SyncRun.audience_id, SyncRun.destination_id, SyncRun.id)
Index("ix_delivery_failures_run", DeliveryFailure.run_id)
