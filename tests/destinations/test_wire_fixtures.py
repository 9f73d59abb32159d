"""What each destination type puts on the wire, compared byte for byte (after JSON
normalisation) with fixtures written from the reference requests: Segment's own Ortto
integration as captured, and the documented examples of Ortto's REST API and Segment's
Tracking API (`fixtures/*.json`, each naming its source).

The fields that legitimately vary, `messageId` and `timestamp`, are set deterministically
(the fixture's message ids, a fixed clock), never left out of the comparison.
"""

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.destinations.common import FAST
from worker.destinations.base import DestinationClient
from worker.destinations.ortto import OrttoDestination, OrttoSettings
from worker.destinations.ortto_api import OrttoApiDestination, OrttoApiSettings
from worker.destinations.ortto_audiences import OrttoAudiencesDestination, OrttoAudiencesSettings
from worker.destinations.segment import SegmentDestination, SegmentSettings
from worker.payloads import AudienceRef, Change, SendAs, delivery_calls, identify_call
from worker.ratelimit import LocalBadRequestGuard

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
AUDIENCE = AudienceRef(id=7, key="order_completed_last_30days", name="Order Completed Last 30days")
# (member id, is anonymous, email, value)
Member = tuple[str, bool, str | None, bool]


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def normalised(body: Any) -> bytes:
    """One byte form for equal JSON values: sorted keys, no spaces, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def calls(members: Sequence[Member], message_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Identify calls as a run builds them, their message ids set to the fixture's."""
    built = []
    for (member_id, is_anonymous, email, value), message_id in zip(
        members, message_ids, strict=True
    ):
        change = Change(member_id, is_anonymous, email, value, previous_run_id=None)
        call = identify_call(AUDIENCE, 1, change, now=NOW)
        assert call["messageId"].startswith("audience-sync-")  # what a run would send
        built.append({**call, "messageId": message_id})
    return built


class Recorder:
    """A transport that keeps each request and answers it from a table, by path."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json=self.answers.get(request.url.path, {}))

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def assert_sent(request: httpx.Request, expected: dict[str, Any]) -> None:
    assert (request.method, str(request.url)) == (expected["method"], expected["url"])
    for name, value in expected["headers"].items():
        assert request.headers.get(name) == value, name
    sent = json.loads(request.content) if request.content else None
    assert normalised(sent) == normalised(expected["body"])


def deliver_all(client: DestinationClient, batches: Sequence[list[dict[str, Any]]]) -> None:
    try:
        for batch in batches:
            assert client.deliver(AUDIENCE, batch) == []
    finally:
        client.close()


def test_ortto_identify_matches_segments_ortto_actions() -> None:
    recorded = fixture("ortto_identify.json")
    enter, exit_ = recorded["requests"]
    members_in: list[Member] = [
        ("u_1", False, "alice@example.com", True),
        ("u_2", False, None, True),
        ("anon_3", True, "carol@example.com", True),
        ("anon_4", True, None, True),
    ]
    members_out: list[Member] = [
        ("u_2", False, None, False),
        ("anon_3", True, "carol@example.com", False),
    ]
    recorder = Recorder({})
    settings = OrttoSettings(api_key=SecretStr("pau-abcdef123456"), rate_limit="1000/s")
    client = OrttoDestination("ortto", settings=settings, http=FAST, transport=recorder.transport)
    deliver_all(
        client,
        [
            calls(members_in, [c["message_id"] for c in enter["body"]]),
            calls(members_out, [c["message_id"] for c in exit_["body"]]),
        ],
    )
    assert len(recorder.requests) == 2
    assert_sent(recorder.requests[0], enter)
    assert_sent(recorder.requests[1], exit_)


def test_ortto_api_matches_the_rest_api_examples() -> None:
    recorded = fixture("ortto_api_merge.json")
    recorder = Recorder(recorded["answers"])
    key = recorded["requests"][0]["headers"]["x-api-key"]
    settings = OrttoApiSettings(api_key=SecretStr(key), rate_limit="1000/s")
    client = OrttoApiDestination(
        "ortto-api",
        settings=settings,
        http=FAST,
        transport=recorder.transport,
        guard=LocalBadRequestGuard("wire-test"),
    )
    # The merge carries no message id: nothing varies but what the fixture pins.
    deliver_all(client, [calls([("u_123", False, "a@example.com", True)], ["unused"])])
    assert len(recorder.requests) == len(recorded["requests"]) == 3
    for request, expected in zip(recorder.requests, recorded["requests"], strict=True):
        assert_sent(request, expected)


@pytest.mark.parametrize("index", [0, 1], ids=["us", "eu"])
def test_segment_batch_matches_the_spec_example(index: int) -> None:
    expected = fixture("segment_batch.json")["requests"][index]
    recorder = Recorder({"/v1/batch": {"success": True}})
    settings = SegmentSettings(
        write_key=SecretStr("segment-write-key-0123"), region=expected["region"]
    )
    client = SegmentDestination(
        "segment", settings=settings, http=FAST, transport=recorder.transport
    )
    [event] = expected["body"]["batch"]
    deliver_all(client, [calls([("u_123", False, "a@example.com", True)], [event["messageId"]])])
    [request] = recorder.requests
    assert_sent(request, expected)


# (member id, is anonymous, email, value) -> the calls a `send_as: track` pair sends.
def track_calls(members: Sequence[Member], message_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Track events as a run builds them, their message ids set to the fixture's."""
    audience = replace(AUDIENCE, send_as=SendAs.TRACK)
    built = []
    for (member_id, is_anonymous, email, value), message_id in zip(
        members, message_ids, strict=True
    ):
        change = Change(member_id, is_anonymous, email, value, previous_run_id=None)
        [call] = delivery_calls(audience, 1, [change], now=NOW)
        assert call["type"] == "track" and call["messageId"].startswith("audience-sync-")
        built.append({**call, "messageId": message_id})
    return built


def test_ortto_track_matches_the_track_activity_shape() -> None:
    [expected] = fixture("ortto_track.json")["requests"]
    members: list[Member] = [
        ("u_1", False, "alice@example.com", True),
        ("anon_3", True, "carol@example.com", True),
        ("u_2", False, None, False),
        ("anon_4", True, None, False),
    ]
    recorder = Recorder({})
    settings = OrttoSettings(api_key=SecretStr("pau-abcdef123456"), rate_limit="1000/s")
    client = OrttoDestination("ortto", settings=settings, http=FAST, transport=recorder.transport)
    deliver_all(client, [track_calls(members, [c["message_id"] for c in expected["body"]])])
    [request] = recorder.requests
    assert_sent(request, expected)


def test_segment_track_matches_the_spec_example() -> None:
    [expected] = fixture("segment_track.json")["requests"]
    recorder = Recorder({"/v1/batch": {"success": True}})
    settings = SegmentSettings(write_key=SecretStr("segment-write-key-0123"))
    client = SegmentDestination(
        "segment", settings=settings, http=FAST, transport=recorder.transport
    )
    members: list[Member] = [("u_123", False, "a@example.com", True), ("anon_4", True, None, False)]
    message_ids = [event["messageId"] for event in expected["body"]["batch"]]
    deliver_all(client, [track_calls(members, message_ids)])
    [request] = recorder.requests
    assert_sent(request, expected)


def test_ortto_audiences_matches_segments_ortto_audiences() -> None:
    recorded = fixture("ortto_audiences.json")
    create, get, members = recorded["requests"]
    recorder = Recorder(recorded["answers"])
    settings = OrttoAudiencesSettings(api_key=SecretStr("pau-abcdef123456"), rate_limit="1000/s")
    client = OrttoAudiencesDestination(
        "ortto-audiences", settings=settings, http=FAST, transport=recorder.transport
    )
    try:
        # The first run creates the audience under its name; the next checks it is there.
        audience_id = client.prepare(AUDIENCE)
        assert audience_id == "ortto_aud_123"
        prepared = replace(AUDIENCE, field_id=audience_id)
        assert client.prepare(prepared) == audience_id
        membership: list[Member] = [
            ("u_1", False, "alice@example.com", True),
            ("u_2", False, None, False),
            ("anon_3", True, "carol@example.com", True),
            ("anon_4", True, None, False),
        ]
        sent = calls(membership, [m["message_id"] for m in members["body"]])
        assert client.deliver(prepared, sent) == []
    finally:
        client.close()
    assert len(recorder.requests) == 3
    for request, expected in zip(recorder.requests, [create, get, members], strict=True):
        assert_sent(request, expected)


def test_a_member_with_both_ids_matches_segments_ortto_integrations() -> None:
    identify, members = fixture("ortto_both_ids.json")["requests"]
    [contact], [member] = identify["body"], members["body"]
    change = Change("u_5", False, "eve@example.com", True, None, anonymous_id="anon_5")
    settings = OrttoSettings(api_key=SecretStr("pau-abcdef123456"), rate_limit="1000/s")
    recorder = Recorder({})
    client = OrttoDestination("ortto", settings=settings, http=FAST, transport=recorder.transport)
    call = identify_call(AUDIENCE, 1, change, now=NOW)
    assert (call["userId"], call["anonymousId"]) == ("u_5", "anon_5")
    deliver_all(client, [[{**call, "messageId": contact["message_id"]}]])
    native = OrttoAudiencesDestination(
        "ortto-audiences",
        settings=OrttoAudiencesSettings(api_key=SecretStr("pau-abcdef123456"), rate_limit="1000/s"),
        http=FAST,
        transport=recorder.transport,
    )
    audience = replace(AUDIENCE, field_id="ortto_aud_123")
    try:
        assert native.deliver(audience, [{**call, "messageId": member["message_id"]}]) == []
    finally:
        native.close()
    assert len(recorder.requests) == 2
    assert_sent(recorder.requests[0], identify)
    assert_sent(recorder.requests[1], members)
