"""Tests of the `ortto-api` destination (Ortto's REST API) against the local fake server."""

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE
from worker.destinations.base import Rejection
from worker.destinations.http import HttpOptions, HttpResult
from worker.destinations.http_client import HttpDestinationClient
from worker.destinations.ortto_api import (
    MAX_PEOPLE_PER_REQUEST,
    OrttoApiDestination,
    OrttoApiSettings,
    field_id_from,
    merge_rejections,
    person_fields,
    refused_merge_rejections,
)
from worker.destinations.registry import build_client, resolve_settings
from worker.errors import ConfigError, DestinationAuthError, DestinationError
from worker.payloads import AudienceRef
from worker.ratelimit import LocalBadRequestGuard
from worker.testing.fake_destinations import (
    DEFAULT_ORTTO_API_KEY,
    FakeDestinations,
    RecordingTransport,
    max_requests_in_window,
    sample_calls,
    spawn_fake_destinations,
)

FAST = HttpOptions(
    connect_timeout=1.0, read_timeout=2.0, max_attempts=5, backoff_base=0.01, backoff_max=0.05
)
FIELD_ID = "bol:cm:order-completed-last-30days"
PREPARED = AudienceRef(id=42, key=AUDIENCE.key, name=AUDIENCE.name, field_id=FIELD_ID)
ANONYMOUS = "anonymous user: Ortto merges people by str::ei (a user id) and this user has none"


def ortto_api(
    fake: FakeDestinations | None = None,
    *,
    key: str | None = None,
    merge_by: list[Any] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> OrttoApiDestination:
    settings = OrttoApiSettings(
        api_key=SecretStr(key or (fake.ortto_api_key if fake else "k")),
        endpoint=fake.url if fake else "http://ortto.test",
        merge_by=merge_by or ["str::ei"],
        rate_limit="1000/s",
    )
    # A guard of its own, so refusals in one test do not hold back the next.
    guard = LocalBadRequestGuard("api-test")
    return OrttoApiDestination(
        "api-test", settings=settings, http=FAST, transport=transport, guard=guard
    )


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> OrttoApiDestination:
    return ortto_api(transport=httpx.MockTransport(handler))


def known_truth(calls: list[dict[str, Any]]) -> dict[str, bool]:
    return {c["userId"]: c["traits"][AUDIENCE.key] for c in calls if c["userId"]}


# -- pure parts ------------------------------------------------------------------------------


def _call(user_id: str | None, email: str | None = None, value: Any = True) -> dict[str, Any]:
    traits: dict[str, Any] = {AUDIENCE.key: value}
    if email:
        traits["email"] = email
    return {"userId": user_id, "anonymousId": None if user_id else "anon", "traits": traits}


@pytest.mark.parametrize(
    ("call", "merge_by", "expected"),
    [
        (_call("u1"), ["str::ei"], {"str::ei": "u1", FIELD_ID: True}),
        (
            _call("u1", "a@example.com", False),
            ["str::ei"],
            {"str::ei": "u1", "str::email": "a@example.com", FIELD_ID: False},
        ),
        (_call(None), ["str::ei"], ANONYMOUS),
        (
            _call(None, "a@example.com"),
            ["str::ei"],
            ANONYMOUS + " (add str::email to merge_by to merge them by email)",
        ),
        (
            _call(None, "a@example.com"),
            ["str::email"],
            {"str::email": "a@example.com", FIELD_ID: True},
        ),
        (
            _call(None, "a@example.com"),
            ["str::ei", "str::email"],
            {"str::email": "a@example.com", FIELD_ID: True},
        ),
        (_call("u1"), ["str::email"], "user has no email, and merge_by is str::email"),
        (_call(None), ["str::ei", "str::email"], ANONYMOUS),
        (
            _call("u1", value="yes"),
            ["str::ei"],
            f"identify call carries no boolean trait {AUDIENCE.key!r}",
        ),
        (_call("u" * 300), ["str::ei"], "str::ei is longer than Ortto's 255 characters"),
    ],
)
def test_person_fields(call: dict[str, Any], merge_by: list[str], expected: Any) -> None:
    assert person_fields(call, AUDIENCE.key, FIELD_ID, merge_by) == expected


@pytest.mark.parametrize(
    ("body", "sent", "expected"),
    [
        (None, [0, 1], []),
        ({}, [0, 1], []),
        ({"people": []}, [0, 1], []),
        ({"people": [{"status": "created"}, {"status": "merged"}]}, [3, 4], []),
        (
            {"people": [{"status": "created"}, {"status": "error", "error": "bad email"}]},
            [3, 4],
            [Rejection(4, None, "rejected by Ortto: bad email")],
        ),
        (
            {"people": [{"person_id": "", "status": "suppressed"}, {"status": "merged"}]},
            [3, 4],
            [
                Rejection(
                    3,
                    None,
                    "suppressed by Ortto: the person is on its suppression list; value not stored",
                )
            ],
        ),
        (
            {"people": [{"status": "queued"}]},
            [0],
            [Rejection(0, None, "Ortto answered status 'queued' for this person")],
        ),
        ({"people": [{}]}, [0], [Rejection(0, None, "Ortto answered status None for this person")]),
        # Misaligned and clean: accepted. Misaligned with an error: all rejected.
        ({"people": [{"status": "created"}]}, [0, 1], []),
        (
            {"people": [{"error": "boom"}]},
            [0, 1],
            [
                Rejection(0, None, "Ortto answered for 1 of 2 people: rejected by Ortto: boom"),
                Rejection(1, None, "Ortto answered for 1 of 2 people: rejected by Ortto: boom"),
            ],
        ),
    ],
)
def test_merge_rejections(body: Any, sent: list[int], expected: list[Rejection]) -> None:
    assert merge_rejections(body, sent) == expected


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            {"field": {"id": "bol:cm:vip", "name": "vip"}, "tracked_value": False},
            ("bol:cm:vip", "vip"),
        ),
        ({"id": "bol:cm:vip", "name": "vip", "display_type": "bool"}, ("bol:cm:vip", "vip")),
        # The create answer, recorded from the live API.
        (
            {
                "name": "Test Field 1762383076",
                "field_id": "str:cm:test-field-1762383076",
                "display_type": "text",
            },
            ("str:cm:test-field-1762383076", "Test Field 1762383076"),
        ),
        ({"name": "vip", "field_id": "", "id": "bol:cm:vip"}, ("bol:cm:vip", "vip")),
        ({"field": {"name": "vip"}}, None),
        ({"id": "", "name": "vip"}, None),
        ("bol:cm:vip", None),
        (None, None),
    ],
)
def test_field_id_from(entry: Any, expected: tuple[str, str] | None) -> None:
    assert field_id_from(entry) == expected


# -- prepare ----------------------------------------------------------------------------------


def test_prepare_creates_the_field_once(fake: FakeDestinations) -> None:
    destination = ortto_api(fake)
    assert destination.prepare(AUDIENCE) == FIELD_ID
    assert fake.custom_fields == {AUDIENCE.key: FIELD_ID}
    assert [a.path for a in fake.arrivals()] == [
        "/v1/person/custom-field/get",
        "/v1/person/custom-field/create",
    ]
    assert destination.prepare(AUDIENCE) == FIELD_ID  # remembered
    assert destination.prepare(PREPARED) == FIELD_ID  # given
    assert len(fake.arrivals()) == 2


def test_prepare_finds_an_existing_field(fake: FakeDestinations) -> None:
    fake.add_custom_field("other", "bool")
    field_id = fake.add_custom_field(AUDIENCE.key, "bool")
    assert ortto_api(fake).prepare(AUDIENCE) == field_id
    assert [a.path for a in fake.arrivals()] == ["/v1/person/custom-field/get"]


def test_prepare_reads_the_recorded_create_answer(fake: FakeDestinations) -> None:
    transport = RecordingTransport()
    assert ortto_api(fake, transport=transport).prepare(AUDIENCE) == FIELD_ID
    create = transport.requests[-1]
    assert json.loads(create.content) == {"name": AUDIENCE.key, "type": "bool"}


@pytest.mark.parametrize("shape", ["nested", "flat"])
def test_prepare_reads_older_create_answers(fake: FakeDestinations, shape: Any) -> None:
    fake.field_create_shape = shape
    assert ortto_api(fake).prepare(AUDIENCE) == FIELD_ID
    assert len(fake.arrivals()) == 2  # read from the answer, not from a second listing


def test_prepare_refuses_a_field_of_another_type(fake: FakeDestinations) -> None:
    fake.add_custom_field(AUDIENCE.key, "text")
    with pytest.raises(ConfigError, match="not a boolean"):
        ortto_api(fake).prepare(AUDIENCE)


def test_prepare_reads_back_a_field_created_meanwhile() -> None:
    listed: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/get"):
            return httpx.Response(200, json={"fields": listed})
        # Another worker won the race: the field now exists, this create is refused.
        listed.append({"field": {"id": "bol:cm:race", "name": AUDIENCE.key}})
        return httpx.Response(409, json={"error": {"message": "duplicate name"}})

    assert mock(handler).prepare(AUDIENCE) == "bol:cm:race"


def test_prepare_never_guesses_an_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/get"):
            return httpx.Response(200, json={"fields": []})
        return httpx.Response(200, json={"ok": True})  # no id in the answer

    with pytest.raises(DestinationError, match="neither its answer nor the field list"):
        mock(handler).prepare(AUDIENCE)


def test_prepare_reports_a_refused_create() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/get"):
            return httpx.Response(200, json={"fields": []})
        return httpx.Response(400, json={"error": {"message": "custom field limit reached"}})

    with pytest.raises(DestinationError, match="custom field limit reached"):
        mock(handler).prepare(AUDIENCE)


# -- deliver ----------------------------------------------------------------------------------


def test_2000_calls_arrive_complete_once_within_limits(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 2_000)
    transport = RecordingTransport()
    destination = ortto_api(fake, transport=transport)
    rejections = destination.deliver(AUDIENCE, calls)  # prepares the field itself

    anonymous = [i for i, call in enumerate(calls) if call["userId"] is None]
    assert len(anonymous) == 200
    assert [r.index for r in rejections] == anonymous
    assert all(r.status is None and r.message.startswith(ANONYMOUS) for r in rejections)
    merges = fake.arrivals("ortto-api")[2:]
    assert [a.items for a in merges] == [MAX_PEOPLE_PER_REQUEST] * 18
    assert all(a.status == 200 and a.path == "/v1/person/merge" for a in merges)
    people = fake.items("ortto-api")
    sent = [call for call in calls if call["userId"]]
    assert [p["fields"]["str::ei"] for p in people] == [call["userId"] for call in sent]
    assert fake.state("ortto-api") == {AUDIENCE.key: known_truth(calls)}

    request = transport.requests[-1]
    assert request.headers["X-Api-Key"] == fake.ortto_api_key
    body = json.loads(request.content)
    assert set(body) == {"people", "merge_by", "merge_strategy", "find_strategy", "async"}
    assert (body["merge_by"], body["merge_strategy"], body["find_strategy"], body["async"]) == (
        ["str::ei"],
        2,
        0,
        True,
    )
    expected = []
    for call in sent[-100:]:
        fields: dict[str, Any] = {"str::ei": call["userId"]}
        if "email" in call["traits"]:
            fields["str::email"] = call["traits"]["email"]
        fields[FIELD_ID] = call["traits"][AUDIENCE.key]
        expected.append({"fields": fields})
    assert body["people"] == expected
    assert {"fields": {"str::ei": "u1902", FIELD_ID: True}} in body["people"]
    assert {
        "fields": {"str::ei": "u1901", "str::email": "user1901@example.com", FIELD_ID: False}
    } in body["people"]


def test_merge_by_email_merges_anonymous_users_with_email(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 30)
    rejections = ortto_api(fake, merge_by=["str::email"]).deliver(AUDIENCE, calls)
    without_email = [i for i, c in enumerate(calls) if "email" not in c["traits"]]
    assert [r.index for r in rejections] == without_email
    assert all("no email" in r.message for r in rejections)
    state = fake.state("ortto-api")[AUDIENCE.key]
    # Keyed by str::ei when known, else by email (the anonymous a29 has one).
    assert state["user29@example.com"] is False and state["user19@example.com"] is False
    assert "a29" not in state and state["u1"] is False and state["u2"] is True
    assert len(state) == 30 - len(without_email)


def test_per_person_errors_and_suppressions_are_rejections(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 300, anonymous_every=0)
    fake.reject_items(["u7", "u250"], message="invalid email address")
    fake.suppress(["u8"])
    rejections = ortto_api(fake).deliver(prepared_at(fake), calls)
    assert [(r.index, r.message) for r in rejections] == [
        (7, "rejected by Ortto: invalid email address"),
        (8, "suppressed by Ortto: the person is on its suppression list; value not stored"),
        (250, "rejected by Ortto: invalid email address"),
    ]
    expected = known_truth(calls)
    for user in ("u7", "u8", "u250"):
        expected.pop(user)
    assert fake.state("ortto-api")[AUDIENCE.key] == expected


def test_without_per_person_detail_all_are_accepted(fake: FakeDestinations) -> None:
    fake.per_person_detail = False
    calls = sample_calls(AUDIENCE, 150, anonymous_every=0)
    assert ortto_api(fake).deliver(prepared_at(fake), calls) == []
    assert len(fake.items("ortto-api")) == 150


@pytest.mark.parametrize("style", ["header", "ortto"])
def test_429_and_5xx_are_survived_with_nothing_lost(fake: FakeDestinations, style: Any) -> None:
    audience = prepared_at(fake)
    fake.add_fault("rate_limit", 1, seconds=0.3, style=style)
    fake.add_fault("server_error", 1, status=503)
    fake.add_fault("rate_limit", 1, seconds=0.2, style=style, path="/v1/person/merge")
    calls = sample_calls(AUDIENCE, 2_000, anonymous_every=0)
    assert ortto_api(fake).deliver(audience, calls) == []
    arrivals = fake.arrivals("ortto-api")
    assert [a.status for a in arrivals[:4]] == [429, 503, 429, 200]
    assert arrivals[1].at - arrivals[0].at >= 0.29
    assert arrivals[3].at - arrivals[2].at >= 0.19
    people = [p["fields"]["str::ei"] for p in fake.items("ortto-api")]
    assert sorted(people) == sorted(c["userId"] for c in calls)
    assert fake.state("ortto-api") == {AUDIENCE.key: known_truth(calls)}


SUPPRESSED_ANSWER = {
    "code": 400,
    "error": "No valid contacts provided (2 invalid or suppressed)",
    "details": [
        {"status": "suppressed", "error": "contact is suppressed"},
        {"status": "invalid", "error": "invalid email address"},
    ],
}


@pytest.mark.parametrize(
    ("body", "sent", "expected"),
    [
        # The recorded shape: one detail per person, each person its own reason.
        (
            SUPPRESSED_ANSWER,
            [4, 9],
            [
                Rejection(4, 400, "suppressed: contact is suppressed"),
                Rejection(9, 400, "invalid: invalid email address"),
            ],
        ),
        # Detail that does not list every person: the request's reason for all.
        (
            {**SUPPRESSED_ANSWER, "details": SUPPRESSED_ANSWER["details"][:1]},
            [4, 9],
            [Rejection(i, 400, SUPPRESSED_ANSWER["error"]) for i in (4, 9)],
        ),
        (
            {"error": {"message": "bad merge_by"}},
            [0, 1],
            [Rejection(0, 400, "bad merge_by"), Rejection(1, 400, "bad merge_by")],
        ),
        (
            {"code": 400, "error": "nope", "details": [{"status": "suppressed"}, "x"]},
            [0, 1],
            [Rejection(0, 400, "nope"), Rejection(1, 400, "nope")],
        ),
    ],
)
def test_refused_merge_rejections(body: Any, sent: list[int], expected: list[Rejection]) -> None:
    message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    result = HttpResult(status=400, body=body, message=message)
    assert refused_merge_rejections(result, sent) == expected


def test_a_request_of_only_suppressed_people_fails_each_person(fake: FakeDestinations) -> None:
    calls = sample_calls(AUDIENCE, 150, anonymous_every=0)
    fake.suppress(f"u{i}" for i in range(100))
    fake.reject_items(["u100"], message="invalid email address")
    fake.suppress(f"u{i}" for i in range(101, 140))
    rejections = ortto_api(fake).deliver(prepared_at(fake), calls)
    # The first request (u0-u99) is refused whole and answers for each person; the second
    # (u100-u149) holds ten valid people, so Ortto answers per person in a 200.
    assert [a.status for a in fake.arrivals("ortto-api")[-2:]] == [400, 200]
    assert rejections[:100] == [
        Rejection(i, 400, "suppressed: contact is suppressed") for i in range(100)
    ]
    assert rejections[100] == Rejection(100, None, "rejected by Ortto: invalid email address")
    assert [r.index for r in rejections[101:]] == list(range(101, 140))
    assert fake.state("ortto-api")[AUDIENCE.key] == {f"u{i}": i % 2 == 0 for i in range(140, 150)}


def test_the_guard_holds_under_1000_suppressed_users(
    fake: FakeDestinations, caplog: pytest.LogCaptureFixture
) -> None:
    """Every merge of a run of suppressed people is refused whole: the client never sends
    more than the guard's limit of them within its window (10 per 15 s in production; a
    half-second window here, to keep the test short), and each person fails on its own."""
    window = 0.5
    audience = prepared_at(fake)
    calls = sample_calls(AUDIENCE, 1_000, anonymous_every=0)
    fake.suppress(c["userId"] for c in calls)
    settings = OrttoApiSettings(
        api_key=SecretStr(fake.ortto_api_key), endpoint=fake.url, rate_limit="1000/s"
    )
    guard = LocalBadRequestGuard("api-test", limit=10, window=window)
    destination = OrttoApiDestination("api-test", settings=settings, http=FAST, guard=guard)
    rejections: list[Rejection] = []
    with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
        # Pages of 25, as a run hands over its changes page by page: 40 refused requests.
        for start in range(0, 1_000, 25):
            page = destination.deliver(audience, calls[start : start + 25])
            rejections += [Rejection(r.index + start, r.status, r.message) for r in page]
    refused = [a for a in fake.arrivals("ortto-api") if a.path == "/v1/person/merge"]
    assert [a.status for a in refused] == [400] * 40
    assert max_requests_in_window([a.at for a in refused], window) <= 10
    assert refused[-1].at - refused[0].at >= 3 * window  # 40 refusals, 10 per window
    assert rejections == [
        Rejection(i, 400, "suppressed: contact is suppressed") for i in range(1_000)
    ]
    assert fake.items("ortto-api") == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "holding further requests back" in warnings[0].getMessage()


def test_the_client_shares_its_accounts_guard(fake: FakeDestinations) -> None:
    """Two clients of one account (two destinations with the same key) share one guard; a
    client of another account has its own."""
    settings = OrttoApiSettings(api_key=SecretStr(f"key-{uuid.uuid4().hex}"), endpoint=fake.url)
    first = build_client("one", settings, http=FAST, limiter=None)
    second = build_client("two", settings, http=FAST, limiter=None)
    assert isinstance(first, OrttoApiDestination) and isinstance(second, OrttoApiDestination)
    other = OrttoApiSettings(api_key=SecretStr(f"key-{uuid.uuid4().hex}"), endpoint=fake.url)
    third = build_client("three", other, http=FAST, limiter=None)
    assert isinstance(third, OrttoApiDestination)
    assert first.bad_request_guard is not None
    assert first.bad_request_guard is second.bad_request_guard
    assert third.bad_request_guard is not first.bad_request_guard
    for client in (first, second, third):
        client.close()


def test_only_the_rest_api_is_guarded() -> None:
    """Ortto's Segment endpoint answers per item within a 200 and Segment names no such ban; only
    the REST API turns a run of suppressed people into refused requests."""
    env = {"KEY": "pau-fake-ortto-segment-key-0123456789"}
    for template in (
        {"type": "ortto", "api_key": "${KEY}"},
        {"type": "segment", "write_key": "${KEY}"},
    ):
        client = build_client("x", resolve_settings("x", template, env), http=FAST, limiter=None)
        assert isinstance(client, HttpDestinationClient)
        assert client.bad_request_guard is None
        client.close()


def test_a_refused_request_rejects_its_people(fake: FakeDestinations) -> None:
    audience = prepared_at(fake)
    fake.add_fault("client_error", 1, status=400, message="bad merge_by")
    rejections = ortto_api(fake).deliver(audience, sample_calls(AUDIENCE, 150, anonymous_every=0))
    assert rejections == [Rejection(i, 400, "bad merge_by") for i in range(100)]
    assert len(fake.items("ortto-api")) == 50


def test_an_unknown_field_id_is_refused_by_the_server(fake: FakeDestinations) -> None:
    # The fake, like Ortto, knows only fields that exist: a guessed id is refused.
    guessed = AudienceRef(id=1, key=AUDIENCE.key, name="x", field_id="bol:cm:guessed")
    rejections = ortto_api(fake).deliver(guessed, sample_calls(AUDIENCE, 3, anonymous_every=0))
    assert [(r.status, "unknown field" in r.message) for r in rejections] == [(400, True)] * 3


def test_401_raises_after_one_request(fake: FakeDestinations) -> None:
    with pytest.raises(DestinationAuthError) as caught:
        ortto_api(fake, key="wrong").deliver(PREPARED, sample_calls(AUDIENCE, 500))
    assert str(caught.value) == "invalid API key for destination api-test"
    assert len(fake.arrivals()) == 1


def test_check_lists_the_fields(fake: FakeDestinations) -> None:
    fake.add_custom_field("vip")
    assert ortto_api(fake).check() == "Ortto accepted the API key (1 custom person fields)"
    assert [a.path for a in fake.arrivals()] == ["/v1/person/custom-field/get"]
    with pytest.raises(DestinationAuthError):
        ortto_api(fake, key="wrong").check()


def test_registry_builds_it(fake: FakeDestinations) -> None:
    template = {"type": "ortto-api", "api_key": "${KEY}", "endpoint": fake.url}
    settings = resolve_settings("built", template, {"KEY": fake.ortto_api_key})
    assert settings == OrttoApiSettings(api_key=SecretStr(fake.ortto_api_key), endpoint=fake.url)
    destination = build_client("built", settings, http=FAST, limiter=None)
    assert isinstance(destination, OrttoApiDestination)
    assert destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 3, anonymous_every=0)) == []
    destination.close()


@pytest.mark.slow
def test_against_a_server_in_another_process() -> None:
    with spawn_fake_destinations() as server:
        server.configure(per_person_detail=False, field_create_shape="flat")
        server.add_fault("suppress", ids=["u1"])
        settings = OrttoApiSettings(api_key=SecretStr(DEFAULT_ORTTO_API_KEY), endpoint=server.url)
        destination = OrttoApiDestination("remote", settings=settings, http=FAST)
        calls = sample_calls(AUDIENCE, 5, anonymous_every=0)
        # Without per-person detail a suppression goes unseen: everything counts as accepted.
        assert destination.deliver(AUDIENCE, calls) == []
        state = server.state()
        assert state["custom_fields"] == {FIELD_ID: AUDIENCE.key}
        expected = known_truth(calls)
        del expected["u1"]
        assert state["state"]["ortto-api"] == {AUDIENCE.key: expected}


def prepared_at(fake: FakeDestinations) -> AudienceRef:
    """The audience with its field already created at the fake (as after `prepare`)."""
    field_id = fake.add_custom_field(AUDIENCE.key)
    return AudienceRef(id=AUDIENCE.id, key=AUDIENCE.key, name=AUDIENCE.name, field_id=field_id)


def test_the_fake_answers_in_the_recorded_shapes(fake: FakeDestinations) -> None:
    """The fake's answers have the shapes recorded from the live API (destination facts), so
    a client reading another shape fails here rather than in production."""
    headers = {"X-Api-Key": fake.ortto_api_key}
    with httpx.Client(base_url=fake.url, headers=headers) as client:
        created = client.post(
            "/v1/person/custom-field/create", json={"name": "Test Field 1762383076", "type": "text"}
        )
        assert created.status_code == 200
        assert created.json() == {
            "name": "Test Field 1762383076",
            "field_id": "str:cm:test-field-1762383076",
            "display_type": "text",
        }
        fake.suppress(["u1"])
        merge = {
            "people": [
                {"fields": {"str::ei": "u1"}},
                {"fields": {"str::email": "no-merge-field@example.com"}},
            ],
            "merge_by": ["str::ei"],
            "merge_strategy": 2,
            "find_strategy": 0,
            "async": True,
        }
        refused = client.post("/v1/person/merge", json=merge)
        assert refused.status_code == 400
        body = refused.json()
        assert set(body) == {"code", "error", "details"} and body["code"] == 400
        assert body["error"].startswith("No valid contacts provided (")
        assert [d["status"] for d in body["details"]] == ["suppressed", "invalid"]
        assert all(set(d) == {"status", "error"} for d in body["details"])
