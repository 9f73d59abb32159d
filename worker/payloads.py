"""Identify calls in Segment-spec form, built once per change and mapped by each destination."""

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class AudienceRef:
    """What a destination needs to know about the audience it is told about."""

    id: int
    key: str
    name: str
    # Destination-side field id (Ortto REST custom field), when the destination uses one.
    field_id: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One membership value to tell a destination about one user."""

    member_id: str
    is_anonymous: bool
    email: str | None
    value: bool
    # The run that recorded the destination's current value for this user (None: never told).
    # Part of the messageId, so a retry repeats the id and a later change gets a new one.
    previous_run_id: int | None


def message_id(audience_id: int, destination_id: int, change: Change) -> str:
    """Deterministic messageId (< 100 characters) for one change of one user."""
    seed = (
        f"{audience_id}:{destination_id}:{change.member_id}:{int(change.value)}:"
        f"{change.previous_run_id if change.previous_run_id is not None else '-'}"
    )
    return "audience-sync-" + hashlib.sha256(seed.encode()).hexdigest()[:40]


def identify_call(
    audience: AudienceRef, destination_id: int, change: Change, *, now: datetime
) -> dict[str, Any]:
    """The Segment-spec identify call carrying `<audience key>: true|false`."""
    traits: dict[str, Any] = {audience.key: change.value}
    if change.email:
        traits["email"] = change.email
    return {
        "type": "identify",
        "userId": None if change.is_anonymous else change.member_id,
        "anonymousId": change.member_id if change.is_anonymous else None,
        "traits": traits,
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": audience.key,
                "computation_id": str(audience.id),
                "namespace": "audience-sync",
            }
        },
        "messageId": message_id(audience.id, destination_id, change),
        "timestamp": now.isoformat().replace("+00:00", "Z"),
    }
