"""Request pacing per destination: the arithmetic, an in-process limiter, a Redis one.

The limiter is GCRA (a token bucket of depth one): requests leave at most one every
`interval`, so no one-second window ever holds more than the limit. A 429 pushes the
next allowed time out for every process sharing the limiter.
"""

import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

from worker.errors import ConfigError

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute)\s*$", re.IGNORECASE)
# Pace slightly under the limit so network jitter never bunches requests over it.
SAFETY_FACTOR = 0.96


@dataclass(frozen=True, slots=True)
class RateLimit:
    requests_per_second: float

    @property
    def interval(self) -> float:
        return 1.0 / (self.requests_per_second * SAFETY_FACTOR)


def parse_rate_limit(text: str) -> RateLimit:
    """Parse `10/s` or `600/m`."""
    match = _RATE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(
            f"rate_limit {text!r} does not parse: write requests per second or minute, "
            "like '10/s' or '600/m'"
        )
    per_second = float(match.group(1))
    if match.group(2)[0].lower() == "m":
        per_second /= 60
    return RateLimit(per_second)


def reserve(next_free_at: float, now: float, interval: float) -> tuple[float, float]:
    """GCRA step: given the next free slot and the time, return (new next free slot, wait)."""
    slot = max(next_free_at, now)
    return slot + interval, slot - now


def postpone(next_free_at: float, now: float, pause_seconds: float) -> float:
    """The next free slot after the server asked everyone to wait `pause_seconds`."""
    return max(next_free_at, now + pause_seconds)


class RateLimiter(Protocol):
    def acquire(self) -> None: ...

    def pause(self, seconds: float) -> None: ...


class LocalRateLimiter:
    """Limiter shared by the threads of one process."""

    def __init__(self, limit: RateLimit) -> None:
        self._interval = limit.interval
        self._next_free_at = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._next_free_at, wait = reserve(self._next_free_at, time.monotonic(), self._interval)
        if wait > 0:
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next_free_at = postpone(self._next_free_at, time.monotonic(), seconds)


# The same arithmetic as reserve()/postpone(), run atomically in Redis on Redis's clock so
# every worker process on every host shares one schedule.
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local next_free = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
local pause = tonumber(ARGV[2])
if pause > 0 then
  next_free = math.max(next_free, now + pause)
  redis.call('SET', KEYS[1], tostring(next_free), 'EX', 3600)
  return '0'
end
local slot = math.max(next_free, now)
redis.call('SET', KEYS[1], tostring(slot + interval), 'EX', 3600)
return tostring(slot - now)
"""


class RedisRateLimiter:
    """Limiter shared by every process that uses the same Redis key."""

    def __init__(self, client: "redis.Redis", key: str, limit: RateLimit) -> None:
        self._client = client
        self._key = key
        self._interval = limit.interval
        self._script = client.register_script(_RESERVE_LUA)

    def acquire(self) -> None:
        wait = float(self._script(keys=[self._key], args=[self._interval, 0]))
        if wait > 0:
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        self._script(keys=[self._key], args=[self._interval, seconds])
