"""Identify call building and message ids."""

from datetime import UTC, datetime

import pytest

from worker.payloads import (
    AudienceRef,
    Change,
    computation_id,
    identify_call,
    message_id,
    personas_context,
    segment_timestamp,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
# Pinned literals, never computed by the functions under test: Segment drops a call whose
# messageId it has seen, so a formula that changed across an upgrade would make a retry look
# new (sent twice) or a new change look like an old one (dropped).
PINNED_MESSAGE_ID = "audience-sync-f21bdcd7be43df75fa2290819c05d13a7986e6f8"
PINNED_COMPUTATION_ID = "aud_ad99416c327ccea4e71dbb64"  # order_completed_last_30days
AUDIENCE = AudienceRef(id=42, key="order_completed_last_30days", name="Order Completed Last 30days")


def test_identify_call_matches_segment_spec() -> None:
    change = Change("u_123", False, "a@example.com", True, None)
    call = identify_call(AUDIENCE, 7, change, now=NOW)
    assert call == {
        "type": "identify",
        "userId": "u_123",
        "anonymousId": None,
        "traits": {"order_completed_last_30days": True, "email": "a@example.com"},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": "order_completed_last_30days",
                "computation_id": PINNED_COMPUTATION_ID,
                "namespace": "audience-sync",
                "space_id": "audience-sync",
            }
        },
        "messageId": PINNED_MESSAGE_ID,
        "timestamp": "2026-11-28T12:00:00.000Z",
    }


def test_space_id_fills_space_id_and_namespace() -> None:
    audience = AudienceRef(id=42, key="vips", name="VIPs", space_id="spa_o1E9shop")
    personas = identify_call(audience, 7, Change("u", False, None, True, None), now=NOW)["context"][
        "personas"
    ]
    assert personas == {
        "computation_class": "audience",
        "computation_key": "vips",
        "computation_id": "aud_708c1ef6daa755c233e43b3b",
        "namespace": "spa_o1E9shop",
        "space_id": "spa_o1E9shop",
    }
    assert personas_context(audience) == personas


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # Pinned values: the id must never change for an audience, whatever the database.
        ("order_completed_last_30days", "aud_ad99416c327ccea4e71dbb64"),
        ("vips", "aud_708c1ef6daa755c233e43b3b"),
    ],
)
def test_computation_id_is_a_stable_string_per_key(key: str, expected: str) -> None:
    assert computation_id(key) == expected
    assert computation_id(key).startswith("aud_")
    assert len(computation_id(key)) == 28


def test_computation_id_does_not_depend_on_the_database_id() -> None:
    first = AudienceRef(id=1, key="vips", name="VIPs")
    again = AudienceRef(id=977, key="vips", name="VIPs (renamed)")
    other = AudienceRef(id=1, key="churn_risk", name="Churn risk")
    assert personas_context(first) == personas_context(again)
    assert personas_context(first)["computation_id"] != personas_context(other)["computation_id"]


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (NOW, "2026-11-28T12:00:00.000Z"),
        (datetime(2026, 11, 28, 12, 0, 1, 123456, tzinfo=UTC), "2026-11-28T12:00:01.123Z"),
        (
            datetime.fromisoformat("2026-11-28T13:00:00+01:00"),
            "2026-11-28T12:00:00.000Z",
        ),
    ],
)
def test_timestamp_is_utc_with_milliseconds(now: datetime, expected: str) -> None:
    assert segment_timestamp(now) == expected


def test_anonymous_member_and_exit_without_email() -> None:
    call = identify_call(AUDIENCE, 7, Change("anon-1", True, None, False, 5), now=NOW)
    assert call["userId"] is None
    assert call["anonymousId"] == "anon-1"
    assert call["traits"] == {"order_completed_last_30days": False}


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        # A retry of the same change (synced state unchanged) repeats the id.
        (Change("u", False, None, True, 3), Change("u", False, "e@x.io", True, 3), True),
        # Entering again after leaving is a new change: the previous run differs.
        (Change("u", False, None, True, 3), Change("u", False, None, True, 9), False),
        (Change("u", False, None, True, None), Change("u", False, None, False, None), False),
        (Change("u", False, None, True, None), Change("v", False, None, True, None), False),
    ],
)
def test_message_id_is_deterministic_per_change(a: Change, b: Change, same: bool) -> None:
    assert (message_id(1, 1, a) == message_id(1, 1, b)) is same
    assert len(message_id(1, 1, a)) < 100


def test_message_id_differs_per_audience_and_destination() -> None:
    change = Change("u", False, None, True, None)
    assert len({message_id(1, 1, change), message_id(2, 1, change), message_id(1, 2, change)}) == 3


def test_message_id_is_pinned() -> None:
    change = Change("u_123", False, "a@example.com", True, None)
    assert message_id(42, 7, change) == PINNED_MESSAGE_ID
