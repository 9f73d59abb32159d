"""Tests of the `ortto-audiences` destination (native Ortto audiences) against the local fake
server: created once, checked before a run, created again when gone; membership add/remove in
batches of 500 with per-item results, retries and pacing; the credentials check."""

import logging
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE, FAST
from worker.destinations.ortto_audiences import (
    OrttoAudiencesDestination,
    OrttoAudiencesSettings,
    audience_member,
)
from worker.destinations.registry import DestinationSettingsError, resolve_settings
from worker.errors import DestinationAuthError, DestinationError
from worker.payloads import AudienceRef, Change, identify_call
from worker.testing.fake_destinations import FakeDestinations, max_requests_in_window

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
KEY = AUDIENCE.key


def client_for(
    fake: FakeDestinations, *, rate_limit: str = "1000/s", key: str | None = None
) -> OrttoAudiencesDestination:
    settings = OrttoAudiencesSettings(
        api_key=SecretStr(key or fake.ortto_key), endpoint=fake.url, rate_limit=rate_limit
    )
    return OrttoAudiencesDestination("native", settings=settings, http=FAST)


def calls_for(changes: list[Change]) -> list[dict[str, object]]:
    return [identify_call(AUDIENCE, 1, change, now=NOW) for change in changes]


def members(count: int, *, value: bool = True) -> list[Change]:
    return [
        Change(f"u{i:04d}", i % 7 == 6, f"u{i}@example.com" if i % 2 else None, value, None)
        for i in range(count)
    ]


def test_a_member_update_carries_the_mode_not_the_boolean() -> None:
    call = identify_call(AUDIENCE, 1, Change("u1", False, "a@example.com", True, None), now=NOW)
    assert audience_member(call, "aud_1", KEY) == {
        "message_id": call["messageId"],
        "user_id": "u1",
        "audience": {"mode": "add", "id": "aud_1"},
        "traits": {"email": "a@example.com"},
    }
    exit_call = identify_call(AUDIENCE, 1, Change("a2", True, None, False, 4), now=NOW)
    assert audience_member(exit_call, "aud_1", KEY) == {
        "message_id": exit_call["messageId"],
        "anonymous_id": "a2",
        "audience": {"mode": "remove", "id": "aud_1"},
        "traits": {},
    }
    assert "boolean trait" in str(audience_member({"userId": "u", "traits": {}}, "aud_1", KEY))


def test_the_audience_is_created_once_then_checked(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        audience_id = client.prepare(replace(AUDIENCE, external_name="Journeys: VIP"))
        assert fake.audiences == {audience_id: "Journeys: VIP"}
        prepared = replace(AUDIENCE, field_id=audience_id)
        assert client.prepare(prepared) == audience_id
        assert client.prepare(prepared) == audience_id
    finally:
        client.close()
    assert [a.path for a in fake.arrivals("ortto-audiences")] == [
        "/v1/audiences/create",
        "/v1/audiences/get",
        "/v1/audiences/get",
    ]
    assert len(fake.audiences) == 1


def test_without_a_name_the_audience_is_named_after_the_audience(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        audience_id = client.prepare(AUDIENCE)
    finally:
        client.close()
    assert fake.audiences == {audience_id: AUDIENCE.name}


def test_an_audience_ortto_lost_is_created_again_with_a_warning(
    fake: FakeDestinations, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(fake)
    try:
        first = client.prepare(AUDIENCE)
        fake.delete_audience(first)
        with caplog.at_level(logging.WARNING):
            second = client.prepare(replace(AUDIENCE, field_id=first))
    finally:
        client.close()
    assert second != first
    assert fake.audiences == {second: AUDIENCE.name}
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no longer has the audience" in record.getMessage()
    assert first in record.getMessage() and second in record.getMessage()


def test_a_refused_create_fails_with_orttos_message(fake: FakeDestinations) -> None:
    fake.add_fault("client_error", status=400, message="audience limit reached")
    client = client_for(fake)
    try:
        with pytest.raises(DestinationError, match="audience limit reached") as caught:
            client.prepare(AUDIENCE)
    finally:
        client.close()
    assert "creating the Ortto audience" in str(caught.value)
    assert fake.audiences == {}


def test_membership_goes_in_batches_of_500_with_add_and_remove(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        audience = replace(AUDIENCE, field_id=client.prepare(AUDIENCE))
        assert client.deliver(audience, calls_for(members(1200))) == []
        leaving = members(1200, value=False)[:300]
        assert client.deliver(audience, calls_for(leaving)) == []
    finally:
        client.close()
    puts = [a for a in fake.arrivals("ortto-audiences") if a.method == "PUT"]
    assert [(a.path, a.items) for a in puts] == [
        ("/v1/audiences/members", n) for n in (500, 500, 200, 300)
    ]
    state = fake.state("ortto-audiences")[str(audience.field_id)]
    assert sum(state.values()) == 900
    assert not any(state[f"u{i:04d}"] for i in range(300))
    for item in fake.items("ortto-audiences"):
        assert KEY not in item["traits"]  # the boolean is the mode, never a trait
        assert set(item["traits"]) <= {"email"}
    assert {"u1@example.com"} <= {i["traits"].get("email") for i in fake.items("ortto-audiences")}


def test_per_item_errors_reject_those_members_only(fake: FakeDestinations) -> None:
    fake.reject_items(["u0003", "u0010"], status=400, message="contact is invalid")
    client = client_for(fake)
    try:
        audience = replace(AUDIENCE, field_id=client.prepare(AUDIENCE))
        rejected = client.deliver(audience, calls_for(members(20)))
    finally:
        client.close()
    assert [(r.index, r.status, r.message) for r in rejected] == [
        (3, 400, "contact is invalid"),
        (10, 400, "contact is invalid"),
    ]
    assert len(fake.state("ortto-audiences")[str(audience.field_id)]) == 18


def test_an_unknown_audience_id_rejects_every_member(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        rejected = client.deliver(replace(AUDIENCE, field_id="nope"), calls_for(members(3)))
    finally:
        client.close()
    assert [r.message for r in rejected] == ["audience not found"] * 3


def test_server_errors_and_429_are_retried(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        audience = replace(AUDIENCE, field_id=client.prepare(AUDIENCE))
        fake.add_fault("server_error", count=2, status=503, path="/v1/audiences/members")
        fake.add_fault("rate_limit", style="ortto", seconds=0.05, path="/v1/audiences/members")
        assert client.deliver(audience, calls_for(members(10))) == []
    finally:
        client.close()
    statuses = [a.status for a in fake.arrivals("ortto-audiences") if a.method == "PUT"]
    assert statuses == [503, 503, 429, 200]
    assert len(fake.state("ortto-audiences")[str(audience.field_id)]) == 10


def test_requests_are_paced_by_the_rate_limit(fake: FakeDestinations) -> None:
    client = client_for(fake, rate_limit="10/s")
    try:
        audience = replace(AUDIENCE, field_id=client.prepare(AUDIENCE))
        # Twelve requests of one member each: no one-second window holds more than ten.
        for change in members(12):
            assert client.deliver(audience, calls_for([change])) == []
    finally:
        client.close()
    times = [a.at for a in fake.arrivals("ortto-audiences")]
    assert len(times) == 13
    assert max_requests_in_window(times) <= 10


def test_check_and_a_wrong_key(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        assert "accepted the API key" in client.check()
    finally:
        client.close()
    wrong = client_for(fake, key="pau-wrong-key-0123456789")
    try:
        with pytest.raises(DestinationAuthError):
            wrong.prepare(AUDIENCE)
    finally:
        wrong.close()


def test_settings_are_those_of_ortto() -> None:
    env = {"K": "pau-abcdef123456"}
    settings = resolve_settings("native", {"type": "ortto-audiences", "api_key": "${K}"}, env)
    assert isinstance(settings, OrttoAudiencesSettings)
    assert settings.rate_limit.requests_per_second == 10
    with pytest.raises(DestinationSettingsError, match="malformed"):
        resolve_settings("native", {"type": "ortto-audiences", "api_key": "${K}"}, {"K": "bad"})


def test_a_reference_without_an_id_is_prepared_on_delivery(fake: FakeDestinations) -> None:
    client = client_for(fake)
    try:
        assert client.deliver(AudienceRef(1, KEY, "Bare"), calls_for(members(2))) == []
    finally:
        client.close()
    assert list(fake.audiences.values()) == ["Bare"]
