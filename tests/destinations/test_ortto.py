"""Tests of the `ortto` destination (Ortto's Segment endpoint) against the local fake server."""

import time
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE, FAST
from worker.destinations.base import Rejection
from worker.destinations.http import HttpOptions
from worker.destinations.ortto import (
    MAX_REQUEST_BYTES,
    OrttoDestination,
    OrttoSettings,
    identify_rejections,
    ortto_contact,
    ortto_identify_base_url,
)
from worker.destinations.registry import build_client, resolve_settings
from worker.errors import DestinationAuthError, DestinationError, TransientDestinationError
from worker.ratelimit import RateLimit
from worker.testing.fake_destinations import (
    FakeDestinations,
    RecordingTransport,
    sample_calls,
    spawn_fake_destinations,
)


def ortto(
    fake: FakeDestinations,
    *,
    key: str | None = None,
    endpoint: str | None = None,
    transport: httpx.BaseTransport | None = None,
    http: HttpOptions = FAST,
) -> OrttoDestination:
    settings = OrttoSettings(
        api_key=SecretStr(key or fake.ortto_key),
        endpoint=endpoint or fake.url,
        rate_limit="1000/s",
    )
    return OrttoDestination("ortto-test", settings=settings, http=http, transport=transport)


def truth(calls: list[dict[str, Any]], key: str) -> dict[str, bool]:
    return {c["userId"] or c["anonymousId"]: c["traits"][key] for c in calls}


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "contact"),
    [
        (
            {
                "type": "identify",
                "userId": "u1",
                "anonymousId": None,
                "traits": {"vip": True, "email": "a@example.com"},
                "context": {"personas": {"computation_key": "vip"}},
                "messageId": "m1",
                "timestamp": "2026-11-28T12:00:00.000Z",
            },
            {
                "user_id": "u1",
                "traits": {"vip": True, "email": "a@example.com"},
                "timestamp": "2026-11-28T12:00:00.000Z",
                "message_id": "m1",
            },
        ),
        (
            {"userId": None, "anonymousId": "anon-1", "traits": {"vip": False}, "messageId": "m2"},
            {"anonymous_id": "anon-1", "traits": {"vip": False}, "message_id": "m2"},
        ),
        ({"userId": "u2"}, {"user_id": "u2", "traits": {}}),
    ],
)
def test_ortto_contact(call: dict[str, Any], contact: dict[str, Any]) -> None:
    assert ortto_contact(call) == contact


@pytest.mark.parametrize(
    ("body", "sent", "expected"),
    [
        (None, [0, 1], []),
        ({}, [0, 1], []),
        ({"errors": []}, [0, 1], []),
        (
            {"errors": [{"status": 400, "message": "bad email", "index": 1}]},
            [5, 7, 9],
            [Rejection(7, 400, "bad email")],
        ),
        (
            {"errors": [{"index": 2, "message": "b"}, {"index": 0, "status": 422}]},
            [3, 4, 5],
            [Rejection(3, 422, "rejected by Ortto"), Rejection(5, None, "b")],
        ),
        # Not tied to a contact: the whole request is rejected rather than lost.
        (
            {"errors": [{"status": 400, "message": "oops"}]},
            [0, 1],
            [
                Rejection(0, 400, "Ortto reported an error for no known contact: oops"),
                Rejection(1, 400, "Ortto reported an error for no known contact: oops"),
            ],
        ),
        (
            {"errors": [{"status": 400, "message": "x", "index": 5}]},
            [0],
            [Rejection(0, 400, "Ortto reported an error for no known contact: x")],
        ),
        (
            {"errors": [{"status": 400, "message": "x", "index": True}]},
            [0],
            [Rejection(0, 400, "Ortto reported an error for no known contact: x")],
        ),
        ({"errors": "broken"}, [0], [Rejection(0, None, "unreadable errors from Ortto: 'broken'")]),
    ],
)
def test_identify_rejections(body: Any, sent: list[int], expected: list[Rejection]) -> None:
    assert identify_rejections(body, sent) == expected


@pytest.mark.parametrize(
    ("key", "endpoint", "base"),
    [
        ("pau-abc", None, "https://segment-action-api-au.ortto.app/v1"),
        ("peu-abc", None, "https://segment-action-api-eu.ortto.app/v1"),
        ("sus-abc", None, "https://segment-action-api-us.ortto-stg.app/v1"),
        ("pau-abc", "http://127.0.0.1:9000", "http://127.0.0.1:9000/v1"),
        ("pau-abc", "http://127.0.0.1:9000/", "http://127.0.0.1:9000/v1"),
        ("pau-abc", "http://127.0.0.1:9000/v1", "http://127.0.0.1:9000/v1"),
        ("pau-abc", "https://proxy.example.com/ortto", "https://proxy.example.com/ortto/v1"),
    ],
)
def test_endpoint_rule(key: str, endpoint: str | None, base: str) -> None:
    settings = OrttoSettings(api_key=SecretStr(key), endpoint=endpoint)
    assert ortto_identify_base_url(settings) == base


# -- against the fake server -------------------------------------------------------------------


def test_2000_calls_arrive_complete_once_within_limits(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 2_000)
    transport = RecordingTransport()
    assert ortto(fake, transport=transport).deliver(AUDIENCE, calls) == []

    arrivals = fake.arrivals("ortto")
    assert [a.items for a in arrivals] == [500, 500, 500, 500]
    assert all(a.status == 200 and a.size <= MAX_REQUEST_BYTES for a in arrivals)
    received = fake.items("ortto")
    assert received == [ortto_contact(call) for call in calls]
    assert len({item["message_id"] for item in received}) == 2_000
    assert fake.state("ortto") == {AUDIENCE.key: truth(calls, AUDIENCE.key)}

    request = transport.requests[0]
    assert request.method == "POST" and request.url.path == "/v1/identify"
    assert request.headers["Authorization"] == f"Bearer {fake.ortto_key}"
    assert request.headers["Content-Type"] == "application/json"


def test_exact_contact_shape(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 10)
    ortto(fake).deliver(AUDIENCE, calls)
    known, anonymous = fake.items("ortto")[1], fake.items("ortto")[9]
    assert known == {
        "user_id": "u1",
        "traits": {AUDIENCE.key: False, "email": "user1@example.com"},
        "timestamp": "2026-11-28T12:00:00.000Z",
        "message_id": calls[1]["messageId"],
    }
    assert anonymous == {
        "anonymous_id": "a9",
        "traits": {AUDIENCE.key: False},
        "timestamp": "2026-11-28T12:00:00.000Z",
        "message_id": calls[9]["messageId"],
    }


def test_requests_are_also_cut_by_bytes(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 600)
    for call in calls:
        call["traits"]["notes"] = "x" * 5_000  # ~5 KB each: 500 would be 2.5 MB
    assert ortto(fake).deliver(AUDIENCE, calls) == []
    arrivals = fake.arrivals("ortto")
    assert len(arrivals) >= 3
    assert all(a.status == 200 and a.size <= MAX_REQUEST_BYTES for a in arrivals)
    assert sum(a.items for a in arrivals) == 600


def test_a_contact_too_large_for_any_request_is_rejected_alone(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 5)
    calls[2]["traits"]["notes"] = "x" * (MAX_REQUEST_BYTES + 10)
    rejections = ortto(fake).deliver(AUDIENCE, calls)
    assert [(r.index, r.status) for r in rejections] == [(2, None)]
    assert "bytes" in rejections[0].message
    assert [item.get("user_id") for item in fake.items("ortto")] == ["u0", "u1", "u3", "u4"]


def test_a_call_without_ids_is_rejected_unsent(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 3)
    calls[1]["userId"] = None
    rejections = ortto(fake).deliver(AUDIENCE, calls)
    assert [r.index for r in rejections] == [1]
    assert len(fake.items("ortto")) == 2


def test_per_item_errors_come_back_as_rejections(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 1_200)
    fake.reject_items(["u5", "a699", "u1100"], status=400, message="email is invalid")
    rejections = ortto(fake).deliver(AUDIENCE, calls)
    assert rejections == [
        Rejection(5, 400, "email is invalid"),
        Rejection(699, 400, "email is invalid"),
        Rejection(1100, 400, "email is invalid"),
    ]
    state = fake.state("ortto")[AUDIENCE.key]
    expected = truth(calls, AUDIENCE.key)
    for rejected in ("u5", "a699", "u1100"):
        expected.pop(rejected)
    assert state == expected


def test_a_refused_request_rejects_its_items_and_the_run_goes_on(fake: FakeDestinations) -> None:
    fake.add_fault("client_error", 1, status=400, message="malformed request")
    calls = sample_calls(AUDIENCE, 1_000)
    rejections = ortto(fake).deliver(AUDIENCE, calls)
    assert rejections == [Rejection(i, 400, "malformed request") for i in range(500)]
    assert [item["message_id"] for item in fake.items("ortto")] == [
        call["messageId"] for call in calls[500:]
    ]


@pytest.mark.parametrize("style", ["header", "ortto"])
def test_429_and_5xx_are_survived_with_nothing_lost(fake: FakeDestinations, style: Any) -> None:
    fake.add_fault("rate_limit", 1, seconds=0.3, style=style)
    fake.add_fault("server_error", 2, status=502)
    fake.add_fault("rate_limit", 1, seconds=0.2, style=style)
    calls = sample_calls(AUDIENCE, 2_000)
    # Four failures in a row on the first request: within five attempts.
    patient = HttpOptions(read_timeout=2.0, max_attempts=5, backoff_base=0.01, backoff_max=0.05)
    assert ortto(fake, http=patient).deliver(AUDIENCE, calls) == []

    arrivals = fake.arrivals("ortto")
    assert [a.status for a in arrivals] == [429, 502, 502, 429, 200, 200, 200, 200]
    assert arrivals[1].at - arrivals[0].at >= 0.29
    assert arrivals[4].at - arrivals[3].at >= 0.19
    ids = [item["message_id"] for item in fake.items("ortto")]
    assert sorted(ids) == sorted(call["messageId"] for call in calls)
    assert fake.state("ortto") == {AUDIENCE.key: truth(calls, AUDIENCE.key)}


def test_a_timeout_mid_run_is_retried(fake: FakeDestinations) -> None:
    fake.add_fault("delay", 1, seconds=3.0, path="/v1/identify")
    calls = sample_calls(AUDIENCE, 700)
    quick = HttpOptions(read_timeout=0.3, max_attempts=3, backoff_base=0.01, backoff_max=0.05)
    started = time.monotonic()
    assert ortto(fake, http=quick).deliver(AUDIENCE, calls) == []
    assert time.monotonic() - started < 2.0  # gave up on the late answer
    # The late request is recorded only when it ends; the two that count arrived.
    assert [a.status for a in fake.arrivals("ortto")] == [200, 200]
    assert len(fake.items("ortto")) == 700


def test_exhausted_retries_fail_the_whole_batch(fake: FakeDestinations) -> None:
    fake.add_fault("server_error", 10, status=500)
    with pytest.raises(TransientDestinationError, match="after 4 attempts: 500"):
        ortto(fake).deliver(AUDIENCE, sample_calls(AUDIENCE, 10))
    assert len(fake.arrivals("ortto")) == FAST.max_attempts


def test_401_raises_after_one_request(fake: FakeDestinations) -> None:
    destination = ortto(fake, key="pau-not-the-right-key")
    with pytest.raises(DestinationAuthError) as caught:
        destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 1_000))
    assert str(caught.value) == "invalid API key for destination ortto-test"
    assert len(fake.arrivals()) == 1 and fake.items("ortto") == []


def test_check_calls_me(fake: FakeDestinations) -> None:
    assert "accepted" in ortto(fake).check()
    assert [(a.method, a.path) for a in fake.arrivals()] == [("GET", "/v1/me")]
    with pytest.raises(DestinationAuthError):
        ortto(fake, key="pau-not-the-right-key").check()


def test_check_reports_a_refusal() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "no such account"}})

    settings = OrttoSettings(api_key=SecretStr("pau-abc"), endpoint="http://o.test")
    destination = OrttoDestination(
        "o", settings=settings, http=FAST, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(DestinationError, match="404: no such account"):
        destination.check()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_both_endpoint_spellings_reach_the_server(fake: FakeDestinations, suffix: str) -> None:
    destination = ortto(fake, endpoint=fake.url + suffix)
    assert destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 2)) == []
    assert [a.path for a in fake.arrivals()] == ["/v1/identify"]


def test_registry_builds_it(fake: FakeDestinations) -> None:
    template = {"type": "ortto", "api_key": "${KEY}", "endpoint": fake.url, "rate_limit": "5/s"}
    settings = resolve_settings("built", template, {"KEY": fake.ortto_key})
    assert settings == OrttoSettings(
        api_key=SecretStr(fake.ortto_key), endpoint=fake.url, rate_limit=RateLimit(5)
    )
    destination = build_client("built", settings, http=FAST, limiter=None)
    assert isinstance(destination, OrttoDestination)
    assert destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 3)) == []
    destination.close()


@pytest.mark.slow
def test_against_a_server_in_another_process() -> None:
    with spawn_fake_destinations() as server:
        server.add_fault("rate_limit", count=1, seconds=0.2, style="ortto")
        server.add_fault("item_error", ids=["u3"], status=422, message="nope")
        settings = OrttoSettings(
            api_key=SecretStr("pau-fake-ortto-segment-key-0123456789"),
            endpoint=server.url,
            rate_limit="1000/s",
        )
        destination = OrttoDestination("remote", settings=settings, http=FAST)
        calls = sample_calls(AUDIENCE, 600)
        assert destination.deliver(AUDIENCE, calls) == [Rejection(3, 422, "nope")]
        state = server.state()
        assert state["counts"]["ortto"] == {"requests": 3, "items": 599}
        expected = truth(calls, AUDIENCE.key)
        del expected["u3"]
        assert state["state"]["ortto"] == {AUDIENCE.key: expected}
        log = server.log("ortto")
        assert [a["status"] for a in log["arrivals"]] == [429, 200, 200]
        server.reset()
        assert server.state()["counts"]["ortto"] == {"requests": 0, "items": 0}
