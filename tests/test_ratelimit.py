"""Tests of worker.ratelimit: the rate arithmetic as tables, the limiters on a real clock; the
bad-request guard's arithmetic as a table, on a simulated clock, and shared through Redis."""

import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.errors import ConfigError
from worker.ratelimit import (
    BAD_REQUEST_LIMIT,
    BAD_REQUEST_WINDOW_SECONDS,
    IN_FLIGHT_HOLD_SECONDS,
    SAFETY_FACTOR,
    BadRequestGuard,
    LocalBadRequestGuard,
    LocalRateLimiter,
    RateLimit,
    RedisBadRequestGuard,
    RedisRateLimiter,
    account_id,
    bad_request_guard,
    bad_request_wait,
    is_bad_request,
    parse_rate_limit,
    postpone,
    reserve,
)
from worker.testing.databases import redis_client as connect_redis


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("10/s", 10.0),
        ("10/sec", 10.0),
        ("10/second", 10.0),
        (" 2.5 / S ", 2.5),
        ("600/m", 10.0),
        ("30/min", 0.5),
        ("1/minute", 1 / 60),
        ("1000/s", 1000.0),
    ],
)
def test_parse_rate_limit(text: str, per_second: float) -> None:
    assert parse_rate_limit(text).requests_per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["", "10", "0/s", "-1/s", "10/h", "ten/s", "10/s/s", "/s"])
def test_parse_rate_limit_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="rate_limit"):
        parse_rate_limit(text)


@pytest.mark.parametrize(
    ("per_second", "interval"),
    [(10.0, 1 / (10 * SAFETY_FACTOR)), (1.0, 1 / SAFETY_FACTOR), (20.0, 1 / (20 * SAFETY_FACTOR))],
)
def test_interval_paces_slightly_under_the_limit(per_second: float, interval: float) -> None:
    limit = RateLimit(per_second)
    assert limit.interval == pytest.approx(interval)
    assert limit.interval > 1 / per_second


@pytest.mark.parametrize(
    ("next_free_at", "now", "interval", "expected"),
    [
        (0.0, 100.0, 0.1, (100.1, 0.0)),  # idle: go now
        (100.0, 100.0, 0.1, (100.1, 0.0)),  # exactly on the slot
        (100.5, 100.0, 0.1, (100.6, 0.5)),  # queued: wait for the slot
        (99.0, 100.0, 0.5, (100.5, 0.0)),  # a stale slot is not saved up as credit
        (103.0, 100.0, 1.0, (104.0, 3.0)),  # paused by a 429
    ],
)
def test_reserve(
    next_free_at: float, now: float, interval: float, expected: tuple[float, float]
) -> None:
    assert reserve(next_free_at, now, interval) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("next_free_at", "now", "pause", "expected"),
    [
        (0.0, 100.0, 10.0, 110.0),
        (100.2, 100.0, 1.0, 101.0),
        (120.0, 100.0, 10.0, 120.0),  # never earlier than already planned
        (100.0, 100.0, 0.0, 100.0),
    ],
)
def test_postpone(next_free_at: float, now: float, pause: float, expected: float) -> None:
    assert postpone(next_free_at, now, pause) == pytest.approx(expected)


def test_consecutive_reservations_are_one_interval_apart() -> None:
    slot, waits = 0.0, []
    for _ in range(5):
        slot, wait = reserve(slot, 10.0, 0.25)
        waits.append(wait)
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def _assert_paced(started: float, times: list[float], interval: float) -> None:
    """The k-th request left no earlier than k intervals after `started` (taken before the
    first acquire). Gaps between neighbours may be shorter: a late wake-up is not credited."""
    for k, at in enumerate(sorted(times)):
        assert at - started >= k * interval - 0.002, (k, at - started)


def _acquire_times(limiter: LocalRateLimiter | RedisRateLimiter, count: int) -> list[float]:
    times = []
    for _ in range(count):
        limiter.acquire()
        times.append(time.monotonic())
    return times


def test_local_limiter_spaces_requests() -> None:
    limit = parse_rate_limit("50/s")
    started = time.monotonic()
    times = _acquire_times(LocalRateLimiter(limit), 11)
    _assert_paced(started, times, limit.interval)


def test_local_limiter_is_shared_by_threads() -> None:
    limit = parse_rate_limit("100/s")
    limiter = LocalRateLimiter(limit)
    times: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for at in _acquire_times(limiter, 5):
            with lock:
                times.append(at)

    threads = [threading.Thread(target=work) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 20 requests from 4 threads still follow one schedule.
    _assert_paced(started, times, limit.interval)


def test_local_limiter_pause_delays_the_next_request() -> None:
    limiter = LocalRateLimiter(parse_rate_limit("1000/s"))
    limiter.acquire()
    started = time.monotonic()
    limiter.pause(0.3)
    limiter.acquire()
    assert time.monotonic() - started >= 0.29


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = connect_redis()
    yield client
    client.close()


@pytest.mark.redis
def test_redis_limiter_spaces_requests_and_pauses(redis_client: redis.Redis) -> None:
    key = f"test:ratelimit:{uuid.uuid4()}"
    limit = parse_rate_limit("40/s")
    limiter = RedisRateLimiter(redis_client, key, limit)
    try:
        started = time.monotonic()
        times = _acquire_times(limiter, 9)
        _assert_paced(started, times, limit.interval)
        started = time.monotonic()
        limiter.pause(0.3)
        limiter.acquire()
        assert time.monotonic() - started >= 0.28
    finally:
        redis_client.delete(key)


# -- the bad-request guard --------------------------------------------------------------------


def test_the_guard_stays_clear_of_orttos_ban() -> None:
    # Ortto bans after 15 bad requests in 15 s.
    assert BAD_REQUEST_LIMIT <= 10 and BAD_REQUEST_WINDOW_SECONDS >= 15.0


@pytest.mark.parametrize(
    ("status", "is_bad"),
    [
        *[(status, True) for status in (400, 401, 403, 404, 409, 422)],
        *[(status, False) for status in (429, 200, 202, 500, 503, 302)],
    ],
)
def test_is_bad_request(status: int, is_bad: bool) -> None:
    assert is_bad_request(status) is is_bad


@pytest.mark.parametrize(
    ("expiries", "now", "limit", "wait"),
    [
        ([], 0.0, 10, 0.0),
        ([20.0] * 9, 5.0, 10, 0.0),  # nine count: a tenth may go
        ([20.0] * 10, 5.0, 10, 15.0),  # ten count: wait for the first to expire
        ([6.0, 7.0, 8.0], 5.0, 3, 1.0),
        ([6.0, 7.0, 8.0, 9.0], 5.0, 3, 2.0),  # two must expire before one more goes
        ([1.0, 2.0, 6.0, 7.0], 5.0, 3, 0.0),  # expired ones do not count
        ([5.0, 6.0, 7.0], 5.0, 3, 0.0),  # one expiring now no longer counts
        ([9.0, 6.0, 8.0], 5.0, 3, 1.0),  # order does not matter
    ],
)
def test_bad_request_wait(expiries: list[float], now: float, limit: int, wait: float) -> None:
    assert bad_request_wait(expiries, now, limit) == pytest.approx(wait)


def test_account_id_names_the_key_without_revealing_it() -> None:
    account = account_id("fake-ortto-api-key-0123456789")
    assert account == account_id("fake-ortto-api-key-0123456789")
    assert account != account_id("another-key-0123456789")
    assert "0123456789" not in account and len(account) == 16


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _max_in_window(times: list[float], window: float) -> int:
    ordered = sorted(times)
    return max(
        (sum(1 for t in ordered if start <= t < start + window) for start in ordered), default=0
    )


def test_the_guard_holds_1000_refused_requests_to_10_per_15s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SimulatedClock()
    guard = LocalBadRequestGuard("acct", clock=clock, sleep=clock.sleep)
    sent: list[float] = []
    with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
        for _ in range(1_000):
            ticket = guard.admit()
            sent.append(clock.now)
            clock.sleep(0.05)  # the request's round trip
            guard.settle(ticket, is_bad=True)
    assert _max_in_window(sent, 15.0) == 10
    # 10 per 15 s (each counting from its answer): about 1,500 s for 1,000 refusals.
    assert sent[-1] - sent[0] >= 99 * 15.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "holding further requests back" in warnings[0].getMessage()


def test_accepted_requests_are_never_held_back() -> None:
    clock = SimulatedClock()
    guard = LocalBadRequestGuard("acct", clock=clock, sleep=clock.sleep)
    for _ in range(1_000):
        guard.settle(guard.admit(), is_bad=False)
    assert clock.now == 1_000.0  # nobody slept


def test_requests_in_flight_count_until_they_are_answered() -> None:
    clock = SimulatedClock()
    tickets: list[str] = []
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        guard.settle(tickets[0], is_bad=False)  # meanwhile, one request in flight is answered

    guard = LocalBadRequestGuard("acct", limit=3, window=15.0, clock=clock, sleep=sleep)
    tickets.extend(guard.admit() for _ in range(3))
    assert sleeps == []
    # A fourth waits: the three in flight might all end refused.
    guard.admit()
    assert sleeps == [pytest.approx(15.0 + IN_FLIGHT_HOLD_SECONDS)]


def test_a_quiet_window_rearms_the_warning(caplog: pytest.LogCaptureFixture) -> None:
    clock = SimulatedClock()
    guard = LocalBadRequestGuard("acct", limit=2, window=15.0, clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="worker.ratelimit"):
        for _ in range(6):
            guard.settle(guard.admit(), is_bad=True)
        clock.sleep(100.0)
        for _ in range(6):
            guard.settle(guard.admit(), is_bad=True)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_one_guard_per_account_in_a_process() -> None:
    account = f"test-{uuid.uuid4().hex}"
    first = bad_request_guard(None, account)
    assert bad_request_guard(LocalRateLimiter(RateLimit(10)), account) is first
    assert bad_request_guard(None, f"{account}-other") is not first


@pytest.mark.redis
def test_redis_guard_is_shared_by_processes(redis_client: redis.Redis) -> None:
    account = f"test-{uuid.uuid4().hex}"
    limiter = RedisRateLimiter(redis_client, f"test:ratelimit:{account}", RateLimit(1000))
    assert isinstance(bad_request_guard(limiter, account), RedisBadRequestGuard)
    key = f"audience_sync:bad_requests:{account}"
    # Two guards on one key stand for two worker processes.
    guards: list[BadRequestGuard] = [
        RedisBadRequestGuard(redis_client, key, limit=4, window=0.5) for _ in range(2)
    ]
    sent: list[float] = []
    lock = threading.Lock()

    def refuse_all(guard: BadRequestGuard) -> None:
        for _ in range(8):
            ticket = guard.admit()
            with lock:
                sent.append(time.monotonic())
            time.sleep(0.005)
            guard.settle(ticket, is_bad=True)

    try:
        threads = [threading.Thread(target=refuse_all, args=(g,)) for g in guards]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(sent) == 16
        assert _max_in_window(sent, 0.5) <= 4
        assert max(sent) - min(sent) >= 3 * 0.5 - 0.05  # 16 refusals, 4 per half second
        # Refusals expire after the window, and accepted requests leave nothing behind.
        time.sleep(0.55)
        started = time.monotonic()
        guards[0].settle(guards[0].admit(), is_bad=False)
        assert time.monotonic() - started < 0.1
        assert redis_client.zcard(key) == 0
    finally:
        redis_client.delete(key)
