"""Request pacing per destination: the arithmetic, an in-process limiter, a Redis one; and
the bad-request guard that keeps a destination account from banning us.

The limiter is GCRA (a token bucket of depth one): requests leave at most one every
`interval`, so no one-second window ever holds more than the limit. A 429 pushes the
next allowed time out for every process sharing the limiter.

The bad-request guard counts the requests to one account that ended in a refusal (see
`is_bad_request`) within a sliding window, and holds the next request back while the window
is full. A request counts from the moment it is admitted (its outcome is unknown until the
answer), so requests in flight in other processes can never push the count over the limit.
Both live where the limiter lives: in Redis when the workers share one, else in the process.
"""

import hashlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from worker.errors import ConfigError

if TYPE_CHECKING:  # the client is built by whoever shares limits through Redis (worker.tasks)
    import redis

log = logging.getLogger(__name__)

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


# Requests in flight beyond what Little's law asks (rate x latency), so that answers slower
# than the average do not leave pacing slots unused.
IN_FLIGHT_HEADROOM = 1.5
# Weight of the newest answer in the smoothed latency.
LATENCY_WEIGHT = 0.2


def requests_in_flight(
    requests_per_second: float, latency_seconds: float | None, *, most: int
) -> int:
    """How many requests to keep in flight so that waiting for answers never slows the
    pacing: rate x latency (Little's law) with IN_FLIGHT_HEADROOM, rounded up, within
    [1, most]. One while no latency has been measured yet."""
    if latency_seconds is None or latency_seconds <= 0 or requests_per_second <= 0:
        return 1
    wanted = math.ceil(requests_per_second * latency_seconds * IN_FLIGHT_HEADROOM)
    return max(1, min(most, wanted))


def smoothed_latency(previous: float | None, sample: float) -> float:
    """The latency estimate after one more answer (an exponentially weighted average)."""
    if previous is None:
        return sample
    return previous + LATENCY_WEIGHT * (sample - previous)


# A request woken this much past its slot gives the slot up and takes a new one: with several
# requests in flight, a late one would leave together with the next one's slot, and the two
# would count in one second of the destination's window. At most LATE_RETRIES times.
LATE_TOLERANCE_SECONDS = 0.01
LATE_RETRIES = 3


def is_late(woke_at: float, slot_at: float) -> bool:
    """Whether a request woken at `woke_at` for its slot at `slot_at` should take another."""
    return woke_at - slot_at > LATE_TOLERANCE_SECONDS


def wait_for_slot(
    take_slot: Callable[[], float],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Sleep until a slot from `take_slot` (which reserves one and returns the wait), taking
    a new one when woken late (see LATE_TOLERANCE_SECONDS)."""
    for attempt in range(LATE_RETRIES + 1):
        asked_at = clock()
        wait = take_slot()
        if wait > 0:
            sleep(wait)
        if attempt == LATE_RETRIES or not is_late(clock(), asked_at + max(wait, 0.0)):
            return


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
        wait_for_slot(self._take_slot)

    def _take_slot(self) -> float:
        with self._lock:
            self._next_free_at, wait = reserve(self._next_free_at, time.monotonic(), self._interval)
        return wait

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
        self.client = client
        self._key = key
        self._interval = limit.interval
        self._script = client.register_script(_RESERVE_LUA)

    def acquire(self) -> None:
        wait_for_slot(lambda: float(self._script(keys=[self._key], args=[self._interval, 0])))

    def pause(self, seconds: float) -> None:
        self._script(keys=[self._key], args=[self._interval, seconds])


# Ortto bans the sending IP for 15 s after 15 bad requests (or bad credentials) in 15 s;
# stay well clear of that.
BAD_REQUEST_LIMIT = 10
BAD_REQUEST_WINDOW_SECONDS = 15.0
# How long an admitted request counts when its process dies before telling its outcome: past
# any request's timeouts, plus the window.
IN_FLIGHT_HOLD_SECONDS = 120.0
BAD_REQUEST_KEY = "audience_sync:bad_requests:{account}"
# A held request looks again this often: requests in flight may be answered (and stop
# counting) long before the hold that covers a process dying with them runs out.
GUARD_RECHECK_SECONDS = 0.05


def is_bad_request(status: int) -> bool:
    """A refusal the destination counts against the sender: any 4xx but 429 (400, 401 and
    403 among them). A 429 is pacing, already handled by the limiter."""
    return 400 <= status < 500 and status != 429


def account_id(secret: str) -> str:
    """A stable name for the account behind an API key that does not reveal the key."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def bad_request_wait(expiries: Iterable[float], now: float, limit: int) -> float:
    """Seconds until one more request may go, given until when each counted request (bad, or
    in flight) counts: 0 while fewer than `limit` still count."""
    live = sorted(expiry for expiry in expiries if expiry > now)
    if len(live) < limit:
        return 0.0
    # Once this many have expired, fewer than `limit` remain.
    return live[len(live) - limit] - now


class BadRequestGuard(Protocol):
    def admit(self) -> str:
        """Wait until a request may go; return the ticket counting it while in flight."""
        ...

    def settle(self, ticket: str, *, is_bad: bool) -> None:
        """The request's outcome: a bad one keeps counting for the window, others stop."""
        ...


class _WaitWarning:
    """Logs one WARNING when requests start being held back, not one per held request: a
    new warning only after a whole window passed without a wait."""

    def __init__(self, account: str, limit: int, window: float) -> None:
        self._account = account
        self._limit = limit
        self._window = window
        self._last_wait_end: float | None = None

    def waiting(self, now: float, wait: float) -> None:
        if self._last_wait_end is None or now - self._last_wait_end > self._window:
            log.warning(
                "destination account %s: %d refused (or unanswered) requests within %gs; "
                "holding further requests back (%.1fs at most) so the destination does not "
                "ban this address",
                self._account,
                self._limit,
                self._window,
                wait,
            )
        self._last_wait_end = now + wait


class LocalBadRequestGuard:
    """Bad-request guard shared by the threads of one process."""

    def __init__(
        self,
        account: str,
        *,
        limit: int = BAD_REQUEST_LIMIT,
        window: float = BAD_REQUEST_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._expiries: dict[str, float] = {}
        self._warning = _WaitWarning(account, limit, window)

    def admit(self) -> str:
        ticket = uuid.uuid4().hex
        while True:
            with self._lock:
                now = self._clock()
                self._expiries = {t: e for t, e in self._expiries.items() if e > now}
                wait = bad_request_wait(self._expiries.values(), now, self._limit)
                if wait <= 0:
                    self._expiries[ticket] = now + self._window + IN_FLIGHT_HOLD_SECONDS
                    return ticket
                self._warning.waiting(now, wait)
            self._sleep(min(wait, GUARD_RECHECK_SECONDS))

    def settle(self, ticket: str, *, is_bad: bool) -> None:
        with self._lock:
            if is_bad:
                self._expiries[ticket] = self._clock() + self._window
            else:
                self._expiries.pop(ticket, None)


# admit: drop what expired; below the limit, count the ticket as in flight and return 0, else
# return the wait. Run atomically on Redis's clock, like the limiter.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count < limit then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 1)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
return tostring(tonumber(oldest[2]) - now)
"""
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if ARGV[2] == '1' then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


class RedisBadRequestGuard:
    """Bad-request guard shared by every process that uses the same Redis key."""

    def __init__(
        self,
        client: "redis.Redis",
        key: str,
        *,
        limit: int = BAD_REQUEST_LIMIT,
        window: float = BAD_REQUEST_WINDOW_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._key = key
        self._limit = limit
        self._window = window
        self._sleep = sleep
        self._admit = client.register_script(_ADMIT_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._warning = _WaitWarning(key.rsplit(":", 1)[-1], limit, window)

    def admit(self) -> str:
        ticket = uuid.uuid4().hex
        hold = self._window + IN_FLIGHT_HOLD_SECONDS
        while True:
            wait = float(self._admit(keys=[self._key], args=[self._limit, hold, ticket]))
            if wait <= 0:
                return ticket
            self._warning.waiting(time.monotonic(), wait)
            self._sleep(min(wait, GUARD_RECHECK_SECONDS))

    def settle(self, ticket: str, *, is_bad: bool) -> None:
        self._settle(keys=[self._key], args=[ticket, int(is_bad), self._window])


_local_guards: dict[str, LocalBadRequestGuard] = {}
_local_guards_lock = threading.Lock()


def bad_request_guard(limiter: RateLimiter | None, account: str) -> BadRequestGuard:
    """The guard of one destination account, kept where `limiter` keeps its pacing: in Redis
    for a RedisRateLimiter (every worker process shares it), else in this process (every
    client of the account in the process shares it)."""
    if isinstance(limiter, RedisRateLimiter):
        return RedisBadRequestGuard(limiter.client, BAD_REQUEST_KEY.format(account=account))
    with _local_guards_lock:
        guard = _local_guards.get(account)
        if guard is None:
            guard = _local_guards[account] = LocalBadRequestGuard(account)
        return guard
