"""Identify call building and message ids."""

from datetime import UTC, datetime

import pytest

from worker.payloads import AudienceRef, Change, identify_call, message_id

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
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
                "computation_id": "42",
                "namespace": "audience-sync",
            }
        },
        "messageId": message_id(42, 7, change),
        "timestamp": "2026-11-28T12:00:00Z",
    }


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
