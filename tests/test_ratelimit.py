"""Tests of worker.ratelimit: the rate arithmetic as tables, the limiters on a real clock."""

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from worker.errors import ConfigError
from worker.ratelimit import (
    SAFETY_FACTOR,
    LocalRateLimiter,
    RateLimit,
    RedisRateLimiter,
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
