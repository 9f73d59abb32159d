"""Identify calls in Segment-spec form, built once per change and mapped by each destination.

Each call carries Engage's `context.personas` (see `personas_context`), so a destination that
already receives Engage audiences sees the same shape from this product.
"""

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The space id written into `context.personas` when the audiences file names none.
DEFAULT_SPACE_ID = "audience-sync"


@dataclass(frozen=True, slots=True)
class AudienceRef:
    """What a destination needs to know about the audience it is told about."""

    id: int
    key: str
    name: str
    # Destination-side field id (Ortto REST custom field), when the destination uses one.
    field_id: str | None = None
    # The workspace's space id: Engage's `context.personas.space_id` and `namespace`.
    space_id: str = DEFAULT_SPACE_ID


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


def computation_id(audience_key: str) -> str:
    """The audience's id as Engage writes it (`aud_...`): derived from the key alone, which is
    fixed for the audience's life and never reused, so it is stable across state databases and
    never exposes a database row number."""
    return "aud_" + hashlib.sha256(audience_key.encode()).hexdigest()[:24]


def personas_context(audience: AudienceRef) -> dict[str, str]:
    """Engage's `context.personas` for one audience. Engage writes the workspace's space id
    into both `space_id` and `namespace`."""
    return {
        "computation_class": "audience",
        "computation_key": audience.key,
        "computation_id": computation_id(audience.key),
        "namespace": audience.space_id,
        "space_id": audience.space_id,
    }


def segment_timestamp(now: datetime) -> str:
    """ISO 8601 in UTC with milliseconds, as Segment writes event timestamps."""
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
        "context": {"personas": personas_context(audience)},
        "messageId": message_id(audience.id, destination_id, change),
        "timestamp": segment_timestamp(now),
    }
