"""Delivery as events (`send_as`): the track call, the calls of a page for each `send_as`, how
rejected calls fold onto changes, and where the `ortto` and `segment` clients send each call
(against the local fake server)."""

from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE, FAST
from worker.destinations.ortto import OrttoDestination, OrttoSettings, ortto_activity
from worker.destinations.segment import SegmentDestination, SegmentSettings
from worker.payloads import (
    AudienceRef,
    CallRejection,
    Change,
    SendAs,
    change_rejections,
    computation_id,
    delivery_calls,
    identify_call,
    message_id,
    track_call,
)
from worker.testing.fake_destinations import FakeDestinations

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
KEY = AUDIENCE.key
ENTER = Change("u_1", False, "a@example.com", True, None)
EXIT = Change("anon_2", True, None, False, 3)


def test_track_call_is_engages_audience_event() -> None:
    audience = replace(AUDIENCE, space_id="spa_o1E9shop")
    assert track_call(audience, 7, ENTER, now=NOW) == {
        "type": "track",
        "event": "Audience Entered",
        "userId": "u_1",
        "anonymousId": None,
        "properties": {"audience_key": KEY, KEY: True},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": KEY,
                "computation_id": computation_id(KEY),
                "namespace": "spa_o1E9shop",
                "space_id": "spa_o1E9shop",
            },
            "traits": {"email": "a@example.com"},
        },
        "messageId": message_id(AUDIENCE.id, 7, ENTER, kind="track"),
        "timestamp": "2026-11-28T12:00:00.000Z",
    }
    exited = track_call(AUDIENCE, 7, EXIT, now=NOW)
    assert exited["event"] == "Audience Exited"
    assert (exited["userId"], exited["anonymousId"]) == (None, "anon_2")
    assert exited["properties"] == {"audience_key": KEY, KEY: False}
    assert "traits" not in exited["context"]  # no email known


def test_the_track_message_id_is_deterministic_and_not_the_identifys() -> None:
    identify = identify_call(AUDIENCE, 7, ENTER, now=NOW)["messageId"]
    track = track_call(AUDIENCE, 7, ENTER, now=NOW)["messageId"]
    assert track != identify
    assert (
        track == track_call(AUDIENCE, 7, ENTER, now=datetime(2027, 1, 1, tzinfo=UTC))["messageId"]
    )
    assert len(track) < 100
    # A later change of the same user (another previous run) gets a new id.
    assert track != track_call(AUDIENCE, 7, replace(ENTER, previous_run_id=9), now=NOW)["messageId"]


@pytest.mark.parametrize(
    ("send_as", "types"),
    [
        (SendAs.IDENTIFY, ["identify", "identify"]),
        (SendAs.TRACK, ["track", "track"]),
        (SendAs.BOTH, ["identify", "track", "identify", "track"]),
    ],
)
def test_delivery_calls_per_send_as(send_as: SendAs, types: list[str]) -> None:
    calls = delivery_calls(replace(AUDIENCE, send_as=send_as), 7, [ENTER, EXIT], now=NOW)
    assert [c["type"] for c in calls] == types
    per_change = len(types) // 2
    assert [c.get("userId") or c.get("anonymousId") for c in calls] == (
        ["u_1"] * per_change + ["anon_2"] * per_change
    )


@dataclass(frozen=True)
class Rejected:
    index: int
    status: int | None
    message: str


@pytest.mark.parametrize(
    ("send_as", "rejected", "expected"),
    [
        (SendAs.IDENTIFY, [], []),
        (SendAs.IDENTIFY, [Rejected(1, 400, "bad")], [CallRejection(1, 400, "bad")]),
        (SendAs.TRACK, [Rejected(0, None, "x")], [CallRejection(0, None, "x")]),
        # both: call 2i is change i's identify, 2i+1 its track; either rejects the change.
        (SendAs.BOTH, [Rejected(1, 400, "no")], [CallRejection(0, 400, "track: no")]),
        (SendAs.BOTH, [Rejected(2, 429, "id")], [CallRejection(1, 429, "identify: id")]),
        (
            SendAs.BOTH,
            [Rejected(3, 400, "t"), Rejected(2, 400, "i"), Rejected(5, 404, "gone")],
            [CallRejection(1, 400, "identify: i"), CallRejection(2, 404, "track: gone")],
        ),
    ],
)
def test_rejected_calls_fold_onto_their_changes(
    send_as: SendAs, rejected: list[Rejected], expected: list[CallRejection]
) -> None:
    assert change_rejections(rejected, send_as) == expected


def test_send_as_crosses_json_as_a_string() -> None:
    ref = AudienceRef(1, "k", "K", send_as="both")  # type: ignore[arg-type]
    assert ref.send_as is SendAs.BOTH
    with pytest.raises(ValueError):
        AudienceRef(1, "k", "K", send_as="email")  # type: ignore[arg-type]


def test_an_ortto_activity_carries_the_email_under_traits() -> None:
    activity = ortto_activity(track_call(AUDIENCE, 7, ENTER, now=NOW))
    assert activity == {
        "user_id": "u_1",
        "event": "Audience Entered",
        "properties": {"audience_key": KEY, KEY: True},
        "traits": {"email": "a@example.com"},
        "timestamp": "2026-11-28T12:00:00.000Z",
        "message_id": message_id(AUDIENCE.id, 7, ENTER, kind="track"),
    }


# -- against the fake server ----------------------------------------------------------------


def _changes(count: int) -> list[Change]:
    return [
        Change(f"u{i:04d}", False, f"u{i}@example.com" if i % 2 else None, i % 3 != 0, None)
        for i in range(count)
    ]


def test_ortto_sends_identifies_and_tracks_to_their_endpoints(fake: FakeDestinations) -> None:
    settings = OrttoSettings(
        api_key=SecretStr(fake.ortto_key), endpoint=fake.url, rate_limit="1000/s"
    )
    client = OrttoDestination("ortto", settings=settings, http=FAST)
    audience = replace(AUDIENCE, send_as=SendAs.BOTH)
    changes = _changes(300)
    fake.reject_items(["u0007"], status=400, message="invalid contact")
    try:
        rejected = client.deliver(audience, delivery_calls(audience, 1, changes, now=NOW))
    finally:
        client.close()
    # 600 calls: 300 to each endpoint, one request each; the rejected user fails in both.
    assert [(a.path, a.items) for a in fake.arrivals("ortto")] == [
        ("/v1/identify", 300),
        ("/v1/track", 300),
    ]
    assert [(r.index, r.status) for r in rejected] == [(14, 400), (15, 400)]
    assert change_rejections(rejected, SendAs.BOTH) == [
        CallRejection(7, 400, "identify: invalid contact")
    ]
    truth = {c.member_id: c.value for c in changes if c.member_id != "u0007"}
    assert fake.state("ortto")[KEY] == truth
    assert fake.state("ortto-track")[KEY] == truth
    tracks = [item for item in fake.items("ortto") if "event" in item]
    assert {item["event"] for item in tracks} == {"Audience Entered", "Audience Exited"}


def test_ortto_track_batches_at_500(fake: FakeDestinations) -> None:
    settings = OrttoSettings(
        api_key=SecretStr(fake.ortto_key), endpoint=fake.url, rate_limit="1000/s"
    )
    client = OrttoDestination("ortto", settings=settings, http=FAST)
    audience = replace(AUDIENCE, send_as=SendAs.TRACK)
    try:
        assert client.deliver(audience, delivery_calls(audience, 1, _changes(1200), now=NOW)) == []
    finally:
        client.close()
    assert [(a.path, a.items) for a in fake.arrivals("ortto")] == [
        ("/v1/track", 500),
        ("/v1/track", 500),
        ("/v1/track", 200),
    ]


def test_segment_sends_tracks_in_the_batch(fake: FakeDestinations) -> None:
    settings = SegmentSettings(
        write_key=SecretStr(fake.segment_write_key), endpoint=fake.url, rate_limit="1000/s"
    )
    client = SegmentDestination("segment", settings=settings, http=FAST)
    audience = replace(AUDIENCE, send_as=SendAs.BOTH)
    changes = _changes(10)
    try:
        assert client.deliver(audience, delivery_calls(audience, 1, changes, now=NOW)) == []
    finally:
        client.close()
    [arrival] = fake.arrivals("segment")
    assert (arrival.path, arrival.items) == ("/v1/batch", 20)
    truth = {c.member_id: c.value for c in changes}
    assert fake.state("segment")[KEY] == truth
    assert fake.state("segment-track")[KEY] == truth


def test_a_member_with_both_ids_sends_both_in_every_call() -> None:
    change = Change("u_5", False, None, True, None, anonymous_id="anon_5")
    for send_as in SendAs:
        for call in delivery_calls(replace(AUDIENCE, send_as=send_as), 1, [change], now=NOW):
            assert (call["userId"], call["anonymousId"]) == ("u_5", "anon_5")
    anonymous = Change("anon_6", True, None, True, None)
    assert identify_call(AUDIENCE, 1, anonymous, now=NOW)["userId"] is None
