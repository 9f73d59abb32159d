"""Membership snapshots: what an audience's query returned at one run."""

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, UTCDateTime


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    member_count: Mapped[int] = mapped_column(Integer, default=0)


class SnapshotMember(Base):
    __tablename__ = "snapshot_members"

    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    # userId, or anonymousId when is_anonymous.
    member_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    is_anonymous: Mapped[bool] = mapped_column(Boolean, default=False)
    email: Mapped[str | None] = mapped_column(String(255))


Index("ix_snapshots_audience_created", Snapshot.audience_id, Snapshot.id)
