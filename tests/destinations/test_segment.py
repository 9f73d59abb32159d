"""Tests of the `segment` destination (HTTP Tracking API batch) against the local fake server."""

import base64
import json
from typing import Any

import pytest
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE, FAST
from worker.destinations.base import Rejection
from worker.destinations.registry import (
    DestinationSettingsError,
    build_client,
    resolve_settings,
)
from worker.destinations.segment import (
    MAX_CALLS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    SegmentDestination,
    SegmentSettings,
)
from worker.errors import DestinationAuthError
from worker.testing.fake_destinations import (
    SEGMENT_MAX_BYTES,
    FakeDestinations,
    RecordingTransport,
    sample_calls,
)


def segment(
    fake: FakeDestinations,
    *,
    key: str | None = None,
    endpoint: str | None = None,
    transport: RecordingTransport | None = None,
) -> SegmentDestination:
    settings = SegmentSettings(
        write_key=SecretStr(key or fake.segment_write_key),
        endpoint=endpoint or fake.url,
        rate_limit="1000/s",
    )
    return SegmentDestination("segment-test", settings=settings, http=FAST, transport=transport)


def truth(calls: list[dict[str, Any]]) -> dict[str, bool]:
    return {c["userId"] or c["anonymousId"]: c["traits"][AUDIENCE.key] for c in calls}


def tiny_calls(count: int) -> list[dict[str, Any]]:
    return [
        {"type": "identify", "userId": f"u{i}", "traits": {"k": True}, "messageId": f"m{i}"}
        for i in range(count)
    ]


def test_2000_calls_arrive_complete_once_within_limits(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 2_000)
    transport = RecordingTransport()
    assert segment(fake, transport=transport).deliver(AUDIENCE, calls) == []

    arrivals = fake.arrivals("segment")
    assert len(arrivals) >= 2  # ~400 bytes a call: the byte limit cuts before 2,500
    assert all(a.status == 200 and a.path == "/v1/batch" for a in arrivals)
    assert all(a.size <= MAX_REQUEST_BYTES < SEGMENT_MAX_BYTES for a in arrivals)
    assert fake.items("segment") == calls  # unchanged, in order, once each
    assert fake.state("segment") == {AUDIENCE.key: truth(calls)}

    request = transport.requests[0]
    expected_auth = base64.b64encode(f"{fake.segment_write_key}:".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected_auth}"
    assert list(json.loads(request.content)) == ["batch"]


def test_requests_are_cut_at_2500_calls(fake: FakeDestinations) -> None:
    calls = tiny_calls(6_000)
    assert segment(fake).deliver(AUDIENCE, calls) == []
    assert [a.items for a in fake.arrivals("segment")] == [MAX_CALLS_PER_REQUEST] * 2 + [1_000]
    assert [item["messageId"] for item in fake.items("segment")] == [c["messageId"] for c in calls]


def test_a_call_over_32kb_is_rejected_unsent(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 4)
    calls[1]["traits"]["notes"] = "x" * 33_000
    rejections = segment(fake).deliver(AUDIENCE, calls)
    assert [(r.index, r.status) for r in rejections] == [(1, None)]
    assert "32 KB" in rejections[0].message
    assert [item["userId"] for item in fake.items("segment")] == ["u0", "u2", "u3"]


def test_a_call_without_ids_is_rejected_unsent(fake: FakeDestinations) -> None:
    calls = tiny_calls(3)
    calls[0]["userId"] = None
    assert [r.index for r in segment(fake).deliver(AUDIENCE, calls)] == [0]
    assert len(fake.items("segment")) == 2


# Segment names its wait in `Retry-After`; Ortto's body hint is Ortto's alone (see test_http).
@pytest.mark.parametrize("style", ["header"])
def test_429_and_5xx_are_survived_with_nothing_lost(fake: FakeDestinations, style: Any) -> None:
    fake.add_fault("rate_limit", 1, seconds=0.3, style=style)
    fake.add_fault("server_error", 1, status=500)
    fake.add_fault("rate_limit", 1, seconds=0.2, style=style)
    calls = sample_calls(AUDIENCE, 2_000)
    assert segment(fake).deliver(AUDIENCE, calls) == []
    arrivals = fake.arrivals("segment")
    assert [a.status for a in arrivals[:4]] == [429, 500, 429, 200]
    assert arrivals[1].at - arrivals[0].at >= 0.29
    assert arrivals[3].at - arrivals[2].at >= 0.19
    assert fake.items("segment") == calls


def test_a_refused_batch_rejects_its_calls(fake: FakeDestinations) -> None:
    fake.add_fault("client_error", 1, status=400, message="invalid batch")
    calls = tiny_calls(3_000)
    rejections = segment(fake).deliver(AUDIENCE, calls)
    assert rejections == [Rejection(i, 400, "invalid batch") for i in range(2_500)]
    assert len(fake.items("segment")) == 500


def test_401_raises_after_one_request(fake: FakeDestinations) -> None:
    with pytest.raises(DestinationAuthError) as caught:
        segment(fake, key="wrong-key").deliver(AUDIENCE, tiny_calls(6_000))
    assert str(caught.value) == "invalid API key for destination segment-test"
    assert len(fake.arrivals()) == 1


def test_check_sends_nothing(fake: FakeDestinations) -> None:
    description = segment(fake).check()
    assert "cannot be checked" in description and f"{fake.url}/v1/batch" in description
    assert fake.arrivals() == []


@pytest.mark.parametrize("suffix", ["", "/", "/v1"])
def test_endpoint_is_the_server_root(fake: FakeDestinations, suffix: str) -> None:
    assert segment(fake, endpoint=fake.url + suffix).deliver(AUDIENCE, tiny_calls(2)) == []
    assert [a.path for a in fake.arrivals()] == ["/v1/batch"]


def test_registry_builds_it(fake: FakeDestinations) -> None:
    template = {"type": "segment", "write_key": "${KEY}", "endpoint": fake.url}
    settings = resolve_settings("built", template, {"KEY": fake.segment_write_key})
    assert settings == SegmentSettings(
        write_key=SecretStr(fake.segment_write_key), endpoint=fake.url
    )
    destination = build_client("built", settings, http=FAST, limiter=None)
    assert isinstance(destination, SegmentDestination)
    assert destination.deliver(AUDIENCE, tiny_calls(3)) == []
    destination.close()


@pytest.mark.parametrize(
    ("settings", "base_url"),
    [
        ({}, "https://api.segment.io"),
        ({"region": "us"}, "https://api.segment.io"),
        ({"region": "eu"}, "https://events.eu1.segmentapis.com"),
        # A configured endpoint overrides the region, whichever it is.
        ({"region": "eu", "endpoint": "https://collector.example/v1"}, "https://collector.example"),
        ({"endpoint": "https://collector.example/"}, "https://collector.example"),
    ],
)
def test_region_chooses_the_host(settings: dict[str, str], base_url: str) -> None:
    template = {"type": "segment", "write_key": "${KEY}", **settings}
    resolved = resolve_settings("regional", template, {"KEY": "write-key-0123456789"})
    destination = build_client("regional", resolved, http=FAST, limiter=None)
    try:
        assert isinstance(destination, SegmentDestination)
        assert destination.base_url == base_url
    finally:
        destination.close()


@pytest.mark.parametrize("region", ["EU", "eu1", "de", ""])
def test_an_unknown_region_is_refused_naming_the_setting(region: str) -> None:
    template = {"type": "segment", "write_key": "${KEY}", "region": region}
    with pytest.raises(DestinationSettingsError) as caught:
        resolve_settings("regional", template, {"KEY": "write-key-0123456789"})
    assert caught.value.loc == ("region",)
    assert str(caught.value) == "destinations.regional: region: Input should be 'us' or 'eu'"
