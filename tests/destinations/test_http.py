"""Tests of the shared HTTP plumbing: hints, retries, auth, pacing, secrecy, over real sockets."""

import itertools
import logging
import multiprocessing
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from tests.destinations.common import AUDIENCE
from worker.destinations.http import (
    MAX_MESSAGE_CHARS,
    DestinationHttpClient,
    HttpOptions,
    SecretHeaderAuth,
    api_root,
    response_message,
    retry_hint_seconds,
)
from worker.destinations.ortto import OrttoDestination, OrttoSettings, try_in_seconds
from worker.destinations.ortto_api import OrttoApiDestination, OrttoApiSettings
from worker.destinations.segment import SegmentDestination, SegmentSettings
from worker.errors import ConfigError, DestinationAuthError, TransientDestinationError
from worker.ratelimit import LocalRateLimiter, RedisRateLimiter, parse_rate_limit
from worker.testing.databases import REDIS_URL, redis_client
from worker.testing.fake_destinations import (
    DEFAULT_ORTTO_KEY,
    FakeDestinations,
    max_requests_in_window,
    sample_calls,
)

FAST = HttpOptions(
    connect_timeout=1.0, read_timeout=1.0, max_attempts=3, backoff_base=0.01, backoff_max=0.05
)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


class RecordingLimiter:
    """A real local limiter that also records what it was asked."""

    def __init__(self, rate: str = "1000/s") -> None:
        self.inner = LocalRateLimiter(parse_rate_limit(rate))
        self.acquired = 0
        self.pauses: list[float] = []

    def acquire(self) -> None:
        self.acquired += 1
        self.inner.acquire()

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.inner.pause(seconds)


class NoLimit:
    def acquire(self) -> None:
        pass

    def pause(self, seconds: float) -> None:
        pass


def ortto_client(
    url: str,
    *,
    key: str = DEFAULT_ORTTO_KEY,
    options: HttpOptions = FAST,
    limiter: Any = None,
    transport: httpx.BaseTransport | None = None,
) -> DestinationHttpClient:
    return DestinationHttpClient(
        destination="ortto-test",
        base_url=url + "/v1",
        auth=SecretHeaderAuth(header="Authorization", secret=SecretStr(key), scheme="bearer"),
        options=options,
        limiter=limiter or RecordingLimiter(),
        transport=transport,
        body_wait=try_in_seconds,
    )


# -- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "body", "expected"),
    [
        ("5", None, 5.0),
        ("0.5", None, 0.5),
        (" 12 ", None, 12.0),
        ("0", None, 0.0),
        ("-3", None, 0.0),
        (format_datetime(NOW + timedelta(seconds=10), usegmt=True), None, 10.0),
        (format_datetime(NOW - timedelta(seconds=10), usegmt=True), None, 0.0),
        (None, {"error": {"code": "rate-limit", "try-in-seconds": 10}}, 10.0),
        (None, {"error": {"code": "rate-limit", "try-in-seconds": 2.5}}, 2.5),
        ("3", {"error": {"try-in-seconds": 10}}, 3.0),  # the header wins
        ("soon", {"error": {"try-in-seconds": 7}}, 7.0),  # unreadable header: the body
        ("", None, None),
        ("soon", None, None),
        (None, None, None),
        (None, {}, None),
        (None, {"error": "rate limit"}, None),
        (None, {"error": {"try-in-seconds": "10"}}, None),
        (None, {"error": {"try-in-seconds": True}}, None),
        (None, [1, 2], None),
    ],
)
def test_retry_hint_seconds(retry_after: str | None, body: Any, expected: float | None) -> None:
    # The body is read by the destination's own rule: Ortto's here.
    hint = retry_hint_seconds(retry_after, body, now=NOW, body_wait=try_in_seconds)
    assert hint == (pytest.approx(expected) if expected is not None else None)


def test_a_body_hint_is_read_only_by_the_destination_that_writes_it() -> None:
    body = {"error": {"code": "rate-limit", "try-in-seconds": 10}}
    assert retry_hint_seconds(None, body, now=NOW) is None
    assert retry_hint_seconds("3", body, now=NOW) == 3.0


@pytest.mark.parametrize(
    ("body", "text", "expected"),
    [
        ({"error": {"code": "bad-request", "message": "no traits"}}, "", "no traits"),
        ({"error": {"code": "rate-limit"}}, "", "rate-limit"),
        ({"error": "invalid write key"}, "", "invalid write key"),
        ({"message": "field too long"}, "", "field too long"),
        (None, "  Bad\n  Gateway ", "Bad Gateway"),
        (None, "", "no reason given"),
        ({"error": {}}, "raw text", "raw text"),
        (None, "x" * 2_000, "x" * MAX_MESSAGE_CHARS),
    ],
)
def test_response_message(body: Any, text: str, expected: str) -> None:
    assert response_message(body, text) == expected


@pytest.mark.parametrize(
    ("endpoint", "root"),
    [
        ("https://api.segment.io", "https://api.segment.io"),
        ("https://api.segment.io/", "https://api.segment.io"),
        ("https://api.segment.io/v1", "https://api.segment.io"),
        ("https://api.segment.io/v1/", "https://api.segment.io"),
        ("http://127.0.0.1:8080/proxy", "http://127.0.0.1:8080/proxy"),
        ("http://127.0.0.1:8080/proxy/v1", "http://127.0.0.1:8080/proxy"),
        (" https://host/v10 ", "https://host/v10"),
    ],
)
def test_api_root(endpoint: str, root: str) -> None:
    assert api_root(endpoint) == root


@pytest.mark.parametrize(
    ("scheme", "header", "expected"),
    [
        ("bearer", "Authorization", "Bearer k-123"),
        ("basic", "Authorization", "Basic azEyMzo="),  # base64("k123:")
        ("plain", "X-Api-Key", "k-123"),
    ],
)
def test_secret_header_auth_builds_the_header(scheme: Any, header: str, expected: str) -> None:
    key = "k123" if scheme == "basic" else "k-123"
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    auth = SecretHeaderAuth(header=header, secret=SecretStr(key), scheme=scheme)
    with httpx.Client(transport=httpx.MockTransport(handler), auth=auth) as client:
        client.get("http://destination.test/")
    assert seen[0].headers[header] == expected
    assert key not in repr(auth)


@pytest.mark.parametrize("endpoint", ["not a url", "ftp://host", "http://", "api.segment.io"])
def test_an_endpoint_that_is_no_http_url_is_a_config_error(endpoint: str) -> None:
    settings = SegmentSettings(write_key="fake-write-key", endpoint=endpoint)
    with pytest.raises(ConfigError, match="not an http"):
        SegmentDestination("bad", settings=settings, http=FAST)


# -- retries and waits, against the real local server -----------------------------------------


def test_success_needs_one_request(fake: FakeDestinations) -> None:
    limiter = RecordingLimiter()
    result = ortto_client(fake.url, limiter=limiter).send("GET", "/me")
    assert result.is_success and result.body["id"] == "fake-account"
    assert len(fake.arrivals()) == 1 and limiter.acquired == 1


@pytest.mark.parametrize("style", ["header", "ortto"])
def test_429_waits_what_the_server_asked_and_pauses_the_limiter(
    fake: FakeDestinations, style: Any
) -> None:
    fake.add_fault("rate_limit", 2, seconds=0.4, style=style)
    limiter = RecordingLimiter()
    result = ortto_client(fake.url, limiter=limiter).send("GET", "/me")
    assert result.is_success
    arrivals = fake.arrivals()
    assert [a.status for a in arrivals] == [429, 429, 200]
    gaps = [b.at - a.at for a, b in itertools.pairwise(arrivals)]
    assert min(gaps) >= 0.39
    assert limiter.pauses == [0.4, 0.4]


def test_429_without_a_hint_backs_off_and_pauses_the_sharers(fake: FakeDestinations) -> None:
    fake.add_fault("rate_limit", 1, style="none")
    limiter = RecordingLimiter()
    assert ortto_client(fake.url, limiter=limiter).send("GET", "/me").is_success
    assert [a.status for a in fake.arrivals()] == [429, 200]
    assert len(limiter.pauses) == 1 and 0 < limiter.pauses[0] <= FAST.backoff_max


def test_5xx_is_retried(fake: FakeDestinations) -> None:
    fake.add_fault("server_error", 2, status=503)
    assert ortto_client(fake.url).send("GET", "/me").is_success
    assert [a.status for a in fake.arrivals()] == [503, 503, 200]


def test_5xx_until_attempts_run_out_raises_transient(fake: FakeDestinations) -> None:
    fake.add_fault("server_error", 10, status=502)
    with pytest.raises(TransientDestinationError) as caught:
        ortto_client(fake.url).send("GET", "/me")
    message = str(caught.value)
    assert "ortto-test" in message and "502" in message and "after 3 attempts" in message
    assert len(fake.arrivals()) == FAST.max_attempts


def test_backoff_grows_between_attempts(fake: FakeDestinations) -> None:
    options = HttpOptions(read_timeout=1.0, max_attempts=4, backoff_base=0.1, backoff_max=1.0)
    fake.add_fault("server_error", 3)
    assert ortto_client(fake.url, options=options).send("GET", "/me").is_success
    times = [a.at for a in fake.arrivals()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4 plus up to 0.1 of jitter each.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4
    assert gaps[2] < 0.9  # at most 0.4 + 0.1 of jitter, with room for a slow machine


def test_read_timeout_is_retried(fake: FakeDestinations) -> None:
    options = HttpOptions(read_timeout=0.2, max_attempts=3, backoff_base=0.01, backoff_max=0.05)
    fake.add_fault("delay", 1, seconds=1.0)
    started = time.monotonic()
    assert ortto_client(fake.url, options=options).send("GET", "/me").is_success
    assert time.monotonic() - started < 1.0  # gave up on the slow answer, did not wait it out
    assert len(fake.arrivals()) >= 1 and fake.arrivals()[-1].status == 200


def test_read_timeouts_until_attempts_run_out_raise_transient(fake: FakeDestinations) -> None:
    options = HttpOptions(read_timeout=0.1, max_attempts=2, backoff_base=0.01, backoff_max=0.02)
    fake.add_fault("delay", 2, seconds=0.5)
    with pytest.raises(TransientDestinationError, match="ReadTimeout"):
        ortto_client(fake.url, options=options).send("GET", "/me")


def test_connection_refused_raises_transient_after_retries(fake: FakeDestinations) -> None:
    client = ortto_client(fake.url)
    assert client.send("GET", "/me").is_success  # a pooled keep-alive connection exists
    fake.stop()
    with pytest.raises(TransientDestinationError, match="ConnectError") as caught:
        client.send("GET", "/me")
    assert "after 3 attempts" in str(caught.value)
    fake.start()  # same port: the client recovers
    assert client.send("GET", "/me").is_success


def test_401_raises_auth_error_after_one_request(fake: FakeDestinations) -> None:
    client = ortto_client(fake.url, key="pau-wrong-key-000")
    with pytest.raises(DestinationAuthError) as caught:
        client.send("GET", "/me")
    assert str(caught.value) == "invalid API key for destination ortto-test"
    assert [a.status for a in fake.arrivals()] == [401]


def test_403_raises_auth_error_without_retry() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(403, json={"error": {"message": "forbidden"}})

    client = ortto_client("http://destination.test", transport=httpx.MockTransport(handler))
    with pytest.raises(DestinationAuthError, match="ortto-test"):
        client.send("GET", "/me")
    assert len(calls) == 1


def test_other_4xx_is_a_final_refusal(fake: FakeDestinations) -> None:
    result = ortto_client(fake.url).send("POST", "/identify", content=b'{"not": "an array"}')
    assert result.status == 400 and not result.is_success
    assert "array" in result.message
    assert [r.status for r in result.reject([3, 4])] == [400, 400]
    assert len(fake.arrivals()) == 1


def test_a_very_long_server_pause_fails_at_once() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(429, headers={"Retry-After": "3600"})

    limiter = RecordingLimiter()
    client = ortto_client(
        "http://destination.test", limiter=limiter, transport=httpx.MockTransport(handler)
    )
    with pytest.raises(TransientDestinationError, match="3600s"):
        client.send("GET", "/me")
    assert len(calls) == 1 and limiter.pauses == [3600.0]


# -- the API key never leaks ------------------------------------------------------------------


def test_the_key_never_appears_in_errors_reprs_or_logs(
    fake: FakeDestinations, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "pau-SeCrEt-0123456789"
    texts: list[str] = []

    def echo_key(request: httpx.Request) -> httpx.Response:
        # A server that quotes the key back in its refusal.
        return httpx.Response(400, json={"error": {"message": f"bad key {secret}"}})

    echoed = ortto_client("http://d.test", key=secret, transport=httpx.MockTransport(echo_key))
    result = echoed.send("GET", "/me")
    texts += [result.message, repr(result), repr(echoed)]

    settings = OrttoSettings(api_key=secret, endpoint=fake.url)
    destination = OrttoDestination("leaky", settings=settings, http=FAST)
    texts += [repr(destination), repr(settings), str(settings), repr(vars(destination))]
    with pytest.raises(DestinationAuthError) as auth_error:
        destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 3))
    texts += [str(auth_error.value), repr(auth_error.value)]

    fake.add_fault("server_error", 5)
    with pytest.raises(TransientDestinationError) as transient:
        ortto_client(fake.url, key=secret).send("GET", "/me")
    texts += [str(transient.value), repr(transient.value), str(transient.value.__cause__)]
    fake.stop()
    with pytest.raises(TransientDestinationError) as refused:
        destination.check()
    texts += [str(refused.value), repr(refused.value), str(refused.value.__cause__)]

    texts += [record.getMessage() for record in caplog.records]
    assert texts and all(secret not in text for text in texts)
    assert "**********" in result.message


# -- pacing ------------------------------------------------------------------------------------


def _ortto(url: str, limiter: Any) -> OrttoDestination:
    settings = OrttoSettings(api_key=DEFAULT_ORTTO_KEY, endpoint=url)
    return OrttoDestination("paced", settings=settings, http=FAST, limiter=limiter)


def test_without_a_limiter_a_burst_exceeds_the_window(fake: FakeDestinations) -> None:
    # The control for the next test: the measurement does see a burst.
    destination = _ortto(fake.url, NoLimit())
    for call in sample_calls(AUDIENCE, 45):
        destination.deliver(AUDIENCE, [call])
    assert max_requests_in_window(a.at for a in fake.arrivals()) > 20


def test_rate_limit_holds_at_the_server(fake: FakeDestinations) -> None:
    destination = _ortto(fake.url, LocalRateLimiter(parse_rate_limit("20/s")))
    for call in sample_calls(AUDIENCE, 45):
        assert destination.deliver(AUDIENCE, [call]) == []
    arrivals = fake.arrivals("ortto")
    assert len(arrivals) == 45
    assert max_requests_in_window(a.at for a in arrivals) <= 20


def test_server_side_throttling_pauses_and_loses_nothing(fake: FakeDestinations) -> None:
    # The fake answers 429 (try-in-seconds 1) past 20 requests a second, like Ortto.
    fake.max_requests_per_second = 20
    limiter = RecordingLimiter("1000/s")
    destination = _ortto(fake.url, limiter)
    calls = sample_calls(AUDIENCE, 25)
    for call in calls:
        assert destination.deliver(AUDIENCE, [call]) == []
    statuses = [a.status for a in fake.arrivals()]
    assert statuses.count(200) == 25 and 429 in statuses
    assert 1.0 in limiter.pauses
    assert len(fake.items("ortto")) == 25


def test_default_limiter_comes_from_the_settings(fake: FakeDestinations) -> None:
    settings = OrttoSettings(api_key=DEFAULT_ORTTO_KEY, endpoint=fake.url, rate_limit="20/s")
    destination = OrttoDestination("paced", settings=settings, http=FAST)
    for call in sample_calls(AUDIENCE, 25):
        destination.deliver(AUDIENCE, [call])
    assert max_requests_in_window(a.at for a in fake.arrivals()) <= 20


def test_each_destination_type_uses_its_limiter(fake: FakeDestinations) -> None:
    limiter = RecordingLimiter()
    destinations = [
        _ortto(fake.url, limiter),
        OrttoApiDestination(
            "api",
            settings=OrttoApiSettings(api_key=fake.ortto_api_key, endpoint=fake.url),
            http=FAST,
            limiter=limiter,
        ),
        SegmentDestination(
            "seg",
            settings=SegmentSettings(write_key=fake.segment_write_key, endpoint=fake.url),
            http=FAST,
            limiter=limiter,
        ),
    ]
    for destination in destinations:
        destination.deliver(AUDIENCE, sample_calls(AUDIENCE, 3, anonymous_every=0))
    # ortto: 1 request; ortto-api: field list, field create, merge; segment: 1.
    assert limiter.acquired == len(fake.arrivals()) == 5


def _deliver_paced(url: str, redis_url: str, key: str, count: int) -> None:
    """Runs in a child process: deliver `count` one-call batches under the shared limiter."""
    client: redis.Redis = redis.Redis.from_url(redis_url)
    limiter = RedisRateLimiter(client, key, parse_rate_limit("20/s"))
    destination = _ortto(url, limiter)
    for call in sample_calls(AUDIENCE, count):
        destination.deliver(AUDIENCE, [call])
    destination.close()


@pytest.mark.redis
@pytest.mark.slow
def test_redis_limiter_holds_across_two_processes(fake: FakeDestinations) -> None:
    client = redis_client()
    key = f"test:http-ratelimit:{uuid.uuid4()}"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_deliver_paced, args=(fake.url, REDIS_URL, key, 23))
        for _ in range(2)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert [worker.exitcode for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        client.delete(key)
        client.close()
    arrivals = fake.arrivals("ortto")
    assert len(arrivals) == 46 and all(a.status == 200 for a in arrivals)
    assert max_requests_in_window(a.at for a in arrivals) <= 20


# -- the bad-request guard -------------------------------------------------------------------


class RecordingGuard:
    """Admits every request and records how each ended."""

    def __init__(self) -> None:
        self.admitted = 0
        self.outcomes: list[bool] = []

    def admit(self) -> str:
        self.admitted += 1
        return f"t{self.admitted}"

    def settle(self, ticket: str, *, is_bad: bool) -> None:
        assert ticket == f"t{len(self.outcomes) + 1}"
        self.outcomes.append(is_bad)


def test_every_attempt_passes_the_guard_and_reports_its_outcome() -> None:
    answers = iter([503, 400, 200, 429, 200, 401])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        headers = {"Retry-After": "0"} if status == 429 else {}
        return httpx.Response(status, json={"error": {"message": "no"}}, headers=headers)

    guard = RecordingGuard()
    client = DestinationHttpClient(
        destination="guarded",
        base_url="http://guarded.test/v1",
        auth=SecretHeaderAuth(header="X-Api-Key", secret=SecretStr("k"), scheme="plain"),
        options=FAST,
        limiter=NoLimit(),
        transport=httpx.MockTransport(handler),
        guard=guard,
    )
    assert client.send("POST", "/a").status == 400  # a 503 retried, then refused
    assert client.send("POST", "/b").status == 200
    assert client.send("POST", "/c").status == 200  # a 429 retried
    with pytest.raises(DestinationAuthError):
        client.send("POST", "/d")
    # Refusals count, bad credentials too; 5xx and 429 are not refusals.
    assert guard.outcomes == [False, True, False, False, False, True]


def test_a_failed_connection_is_not_a_refusal() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    guard = RecordingGuard()
    client = DestinationHttpClient(
        destination="guarded",
        base_url="http://guarded.test/v1",
        auth=SecretHeaderAuth(header="X-Api-Key", secret=SecretStr("k"), scheme="plain"),
        options=FAST,
        limiter=NoLimit(),
        transport=httpx.MockTransport(handler),
        guard=guard,
    )
    with pytest.raises(TransientDestinationError):
        client.send("POST", "/a")
    assert guard.outcomes == [False] * FAST.max_attempts
