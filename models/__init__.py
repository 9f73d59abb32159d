"""SQLAlchemy models of the state database (schema changes only through migrations/)."""

from models.audience import Audience, AudienceDestination, Destination, Source
from models.base import Base
from models.observability import AlertChannel, AlertSent, AlertState, Heartbeat
from models.snapshot import AudienceMember, MembershipPeriod, Snapshot
from models.sync import DeliveryFailure, FailingMember, RunChange, SyncedMember, SyncRun

__all__ = [
    "AlertChannel",
    "AlertSent",
    "AlertState",
    "Audience",
    "AudienceDestination",
    "AudienceMember",
    "Base",
    "DeliveryFailure",
    "Destination",
    "FailingMember",
    "Heartbeat",
    "MembershipPeriod",
    "RunChange",
    "Snapshot",
    "Source",
    "SyncRun",
    "SyncedMember",
]
