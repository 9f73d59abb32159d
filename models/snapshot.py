"""Membership: each audience's current members kept once, the past kept as a log of
membership periods, and one small row per kept snapshot (a run's view of the source).

A run's source result lands in a staging table first (see `worker.repositories.snapshots`);
only the difference between it and the current membership is written here.
"""

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime

BigId = BigInteger().with_variant(Integer, "sqlite")


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    member_count: Mapped[int] = mapped_column(Integer, default=0)


class AudienceMember(Base):
    """A current member of an audience, as its latest applied snapshot returned it. The email
    is not kept here: a destination's synced state keeps the one it was sent, and the
    staging table has the source's current one."""

    __tablename__ = "audience_members"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    # userId or anonymousId (which of the two, and the email, are kept by the synced state).
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The snapshot the member entered in (the start of its current membership period).
    entered_snapshot_id: Mapped[int] = mapped_column(BigId)


class MembershipPeriod(Base):
    """A past membership period of one user, written when the user exits: together with
    `audience_members.entered_snapshot_id` it is the log of who entered and exited in which
    snapshot. Kept for the retention setting, then pruned."""

    __tablename__ = "membership_log"

    audience_id: Mapped[int] = mapped_column(
        ForeignKey("audiences.id", ondelete="CASCADE"), primary_key=True
    )
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    exited_snapshot_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    entered_snapshot_id: Mapped[int] = mapped_column(BigId)
    exited_at: Mapped[datetime] = mapped_column(UTCDateTime())


Index("ix_snapshots_audience_created", Snapshot.audience_id, Snapshot.id)
