"""Identify and track calls in Segment-spec form, built once per change and mapped by each
destination.

Each call carries Engage's `context.personas` (see `personas_context`), so a destination that
already receives Engage audiences sees the same shape from this product. A pair's `send_as`
says which calls a change becomes: the identify (`<key>: true|false`), the track event
(`Audience Entered` / `Audience Exited`), or both; `delivery_calls` builds them for a page and
`change_rejections` folds the destination's per-call answers back onto the changes.
"""

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

# The space id written into `context.personas` when the audiences file names none.
DEFAULT_SPACE_ID = "audience-sync"

ENTERED_EVENT = "Audience Entered"
EXITED_EVENT = "Audience Exited"


class SendAs(enum.StrEnum):
    """What a pair's changes are delivered as; stored as these strings in
    `audience_destinations.send_as`."""

    IDENTIFY = "identify"
    TRACK = "track"
    BOTH = "both"


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
    # The calls each change becomes at this destination (the pair's `send_as`).
    send_as: SendAs = SendAs.IDENTIFY
    # The name a destination-side object is created with (the Ortto audience of an
    # `ortto-audiences` pair): the pair's `ortto_audience_name`, else the audience's name.
    external_name: str | None = None

    def __post_init__(self) -> None:
        # References cross Celery as JSON, where send_as arrives as a plain string.
        object.__setattr__(self, "send_as", SendAs(self.send_as))


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
    # A member identified by its user id may also have an anonymous id: it travels with the
    # user id (Engage sends both, which lets the destination link the anonymous profile).
    anonymous_id: str | None = None


def message_id(audience_id: int, destination_id: int, change: Change, *, kind: str = "") -> str:
    """Deterministic messageId (< 100 characters) for one change of one user. `kind` tells
    the calls of one change apart (the track event's id differs from the identify's)."""
    seed = (
        f"{audience_id}:{destination_id}:{change.member_id}:{int(change.value)}:"
        f"{change.previous_run_id if change.previous_run_id is not None else '-'}"
    )
    if kind:
        seed += f":{kind}"
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


def call_ids(change: Change) -> dict[str, str | None]:
    """`userId` and `anonymousId` of a call: the member's id in its place, and the anonymous
    id that travels with a user id, when the member has both."""
    if change.is_anonymous:
        return {"userId": None, "anonymousId": change.member_id}
    return {"userId": change.member_id, "anonymousId": change.anonymous_id}


def identify_call(
    audience: AudienceRef, destination_id: int, change: Change, *, now: datetime
) -> dict[str, Any]:
    """The Segment-spec identify call carrying `<audience key>: true|false`."""
    traits: dict[str, Any] = {audience.key: change.value}
    if change.email:
        traits["email"] = change.email
    return {
        "type": "identify",
        **call_ids(change),
        "traits": traits,
        "context": {"personas": personas_context(audience)},
        "messageId": message_id(audience.id, destination_id, change),
        "timestamp": segment_timestamp(now),
    }


def track_call(
    audience: AudienceRef, destination_id: int, change: Change, *, now: datetime
) -> dict[str, Any]:
    """The Segment-spec track event Engage sends for a membership change: `Audience Entered`
    (`<key>: true`) or `Audience Exited` (`false`), the key also in `properties.audience_key`.
    A known email travels in `context.traits.email`, where Segment's track calls carry it."""
    context: dict[str, Any] = {"personas": personas_context(audience)}
    if change.email:
        context["traits"] = {"email": change.email}
    return {
        "type": "track",
        "event": ENTERED_EVENT if change.value else EXITED_EVENT,
        **call_ids(change),
        "properties": {"audience_key": audience.key, audience.key: change.value},
        "context": context,
        "messageId": message_id(audience.id, destination_id, change, kind="track"),
        "timestamp": segment_timestamp(now),
    }


def calls_per_change(send_as: SendAs) -> int:
    return 2 if send_as == SendAs.BOTH else 1


def delivery_calls(
    audience: AudienceRef, destination_id: int, changes: Sequence[Change], *, now: datetime
) -> list[dict[str, Any]]:
    """The calls of a page of changes, in change order: with `both`, each change's identify
    then its track event (so call `i` belongs to change `i // 2`)."""
    calls: list[dict[str, Any]] = []
    for change in changes:
        if audience.send_as != SendAs.TRACK:
            calls.append(identify_call(audience, destination_id, change, now=now))
        if audience.send_as != SendAs.IDENTIFY:
            calls.append(track_call(audience, destination_id, change, now=now))
    return calls


@dataclass(frozen=True, slots=True)
class CallRejection:
    """A change some of whose calls the destination rejected (by the change's index)."""

    index: int
    status: int | None
    message: str


class RejectedCall(Protocol):
    """A call a destination rejected, by its index among the calls it was given."""

    @property
    def index(self) -> int: ...

    @property
    def status(self) -> int | None: ...

    @property
    def message(self) -> str: ...


def change_rejections(rejected: Sequence[RejectedCall], send_as: SendAs) -> list[CallRejection]:
    """Rejected calls `(call index, status, message)` folded onto their changes: a change is
    accepted only when all of its calls were, so a rejection of either call of `both`
    rejects the change (its first rejection's status and reason, naming the call)."""
    per_change = calls_per_change(send_as)
    found: dict[int, CallRejection] = {}
    for call in sorted(rejected, key=lambda r: r.index):
        index, status, message = call.index, call.status, call.message
        change_index = index // per_change
        if change_index in found:
            continue
        if per_change > 1:
            message = f"{'track' if index % per_change else 'identify'}: {message}"
        found[change_index] = CallRejection(change_index, status, message)
    return [found[i] for i in sorted(found)]
