"""Shared HTTP plumbing of the HTTP destinations: one pooled client, pacing, retries, errors.

Every request waits for the destination's RateLimiter, then is retried on transient failures
(transport errors, timeouts, 429, 5xx) with exponential backoff and jitter, at most
`HttpOptions.max_attempts` times. A 429 waits what the server asked (`Retry-After`, else what
the destination reads from the answer's body, through its `body_wait`) and pauses the limiter
so every process sharing it waits too. 401/403 raise DestinationAuthError at once; any other
refusal comes back as an `HttpResult` whose items the caller rejects, so the run goes on.
With a `BadRequestGuard` (destinations that ban senders of refused requests), each request is
admitted by the guard first and tells it whether it ended in a refusal.

The API key stays a SecretStr until `SecretHeaderAuth` writes it into the outgoing header; it is
scrubbed from every message built from a server answer.
"""

import base64
import json
import logging
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import tenacity
from pydantic import SecretStr

from worker.destinations.base import Rejection
from worker.errors import (
    ConfigError,
    DestinationAuthError,
    DestinationError,
    TransientDestinationError,
)
from worker.ratelimit import BadRequestGuard, RateLimiter, is_bad_request

log = logging.getLogger(__name__)
# httpx logs every request at INFO, which would drown a worker's log (one line per batch):
# this module logs each request at DEBUG instead, with the destination's name.
logging.getLogger("httpx").setLevel(logging.WARNING)

# A server asking for a longer pause than this fails the run (the scheduler retries it later)
# instead of parking a worker for that long.
MAX_SERVER_WAIT_SECONDS = 300.0
# Server messages are stored with each rejection: keep them readable and bounded.
MAX_MESSAGE_CHARS = 500
MIN_SCRUBBED_KEY_CHARS = 8


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Timeouts and retry bounds shared by the HTTP destinations (from Settings)."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0


@dataclass(frozen=True, slots=True)
class HttpResult:
    """An answer that is final: a 2xx, or a refusal of the whole request (4xx but 401/403)."""

    status: int
    # The decoded JSON body, or None. Kept out of the repr: a server may quote the key back.
    body: Any = field(repr=False)
    message: str  # the server's reason for a refusal, with the key masked

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    def reject(self, indexes: Iterable[int]) -> list[Rejection]:
        """Every item of a refused request, rejected with the request's status and reason."""
        return [Rejection(index, self.status, self.message) for index in indexes]


def encode_json(value: Any) -> bytes:
    """Compact JSON, the encoding whose size the batching counts."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def api_root(endpoint: str) -> str:
    """The server root of a configured endpoint: trailing `/` and one trailing `/v1` dropped,
    so `https://host` and `https://host/v1` both reach `https://host/v1/...`."""
    root = endpoint.strip().rstrip("/")
    return root.removesuffix("/v1")


# Reads the wait a 429's body asks for, in a destination's own format; None if it names none.
BodyWait = Callable[[Any], float | None]


def no_body_wait(_body: Any) -> float | None:
    """For destinations whose 429 bodies name no wait."""
    return None


def retry_hint_seconds(
    retry_after: str | None, body: Any, *, now: datetime, body_wait: BodyWait = no_body_wait
) -> float | None:
    """Seconds a 429 asked to wait: `Retry-After` (seconds or an HTTP date), else what
    `body_wait` reads from the body; None when the answer names no wait."""
    if retry_after is not None and retry_after.strip():
        text = retry_after.strip()
        try:
            return max(0.0, float(text))
        except ValueError:
            pass  # not seconds: try the HTTP-date form below
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, (when - now).total_seconds())
    return body_wait(body)


def response_message(body: Any, text: str) -> str:
    """The server's reason, from the usual error shapes, else the start of the raw text."""
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("code")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message")
    if isinstance(message, str) and message:
        return message[:MAX_MESSAGE_CHARS]
    return (" ".join(text.split()) or "no reason given")[:MAX_MESSAGE_CHARS]


class SecretHeaderAuth(httpx.Auth):
    """Writes the API key into one header as each request leaves; the key stays a SecretStr."""

    def __init__(
        self, *, header: str, secret: SecretStr, scheme: Literal["bearer", "basic", "plain"]
    ) -> None:
        self.header = header
        self._secret = secret
        self._scheme = scheme

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        key = self._secret.get_secret_value()
        if self._scheme == "bearer":
            value = f"Bearer {key}"
        elif self._scheme == "basic":
            # Segment's write key is the user name; the password is empty.
            value = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        else:
            value = key
        request.headers[self.header] = value
        yield request

    def scrub(self, text: str) -> str:
        """The text with the key (should a server echo it) masked. Keys shorter than
        MIN_SCRUBBED_KEY_CHARS are left alone: masking them would garble ordinary words."""
        key = self._secret.get_secret_value()
        return text.replace(key, "**********") if len(key) >= MIN_SCRUBBED_KEY_CHARS else text

    def __repr__(self) -> str:
        return f"<SecretHeaderAuth {self.header}>"


class _RetryableFailure(Exception):
    """One failed attempt worth another; `wait_hint` is the wait the server asked for."""

    def __init__(
        self, reason: str, *, wait_hint: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(reason)
        self.wait_hint = wait_hint
        self.status = status


class DestinationHttpClient:
    """One keep-alive httpx.Client for one destination object, with pacing and retries."""

    def __init__(
        self,
        *,
        destination: str,
        base_url: str,
        auth: SecretHeaderAuth,
        options: HttpOptions,
        limiter: RateLimiter,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        body_wait: BodyWait = no_body_wait,
        guard: BadRequestGuard | None = None,
    ) -> None:
        self.destination = destination
        self.base_url = _checked_base_url(destination, base_url)
        self._auth = auth
        self._options = options
        self._limiter = limiter
        self._sleep = sleep
        self._body_wait = body_wait
        self._guard = guard
        self._client = httpx.Client(
            base_url=self.base_url,
            auth=auth,
            timeout=httpx.Timeout(
                connect=options.connect_timeout,
                read=options.read_timeout,
                write=options.read_timeout,
                pool=options.connect_timeout,
            ),
            headers={"Accept": "application/json", "User-Agent": "audience-sync"},
            transport=transport,
            follow_redirects=False,
        )
        # Exponential backoff plus up to one base of jitter, so retrying workers spread out.
        self._backoff = tenacity.wait_exponential(
            multiplier=options.backoff_base, max=options.backoff_max
        ) + tenacity.wait_random(0, options.backoff_base)

    def send(self, method: str, path: str, *, content: bytes | None = None) -> HttpResult:
        """Send one request (paced, retried); return its final answer.

        Raises DestinationAuthError on 401/403 and TransientDestinationError once the attempts
        ran out or the server asked for too long a pause.
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, self._options.max_attempts)),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_RetryableFailure),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=False,
        )
        try:
            return retrying(self._attempt, method, path, content)
        except tenacity.RetryError as exc:
            failure = exc.last_attempt.exception()
            attempts = exc.last_attempt.attempt_number
            raise TransientDestinationError(
                f"destination {self.destination}: {method} {self.base_url}{path} failed after "
                f"{attempts} attempt{'s' if attempts != 1 else ''}: {failure}"
            ) from failure

    @property
    def guard(self) -> BadRequestGuard | None:
        return self._guard

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"<DestinationHttpClient {self.destination!r} {self.base_url}>"

    def _attempt(self, method: str, path: str, content: bytes | None) -> HttpResult:
        if self._guard is None:
            return self._answer(method, path, self._request(method, path, content))
        ticket = self._guard.admit()
        is_bad = False
        try:
            response = self._request(method, path, content)
            is_bad = is_bad_request(response.status_code)
        finally:
            self._guard.settle(ticket, is_bad=is_bad)
        return self._answer(method, path, response)

    def _request(self, method: str, path: str, content: bytes | None) -> httpx.Response:
        self._limiter.acquire()
        headers = {"Content-Type": "application/json"} if content is not None else None
        started = time.monotonic()
        try:
            response = self._client.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:  # timeouts, refused or dropped connections
            raise _RetryableFailure(self._auth.scrub(f"{type(exc).__name__} ({exc})")) from exc
        log.debug(
            "destination %s: %s %s%s answered %d in %.3fs",
            self.destination,
            method,
            self.base_url,
            path,
            response.status_code,
            time.monotonic() - started,
        )
        return response

    def _answer(self, method: str, path: str, response: httpx.Response) -> HttpResult:
        status = response.status_code
        if status in (401, 403):
            raise DestinationAuthError(self.destination)
        body = _json_or_none(response)
        message = self._auth.scrub(response_message(body, response.text))
        if status == 429:
            hint = retry_hint_seconds(
                response.headers.get("Retry-After"),
                body,
                now=datetime.now(UTC),
                body_wait=self._body_wait,
            )
            if hint is not None:
                # Tell every process sharing the limiter, not only this retry.
                self._limiter.pause(hint)
                if hint > MAX_SERVER_WAIT_SECONDS:
                    raise TransientDestinationError(
                        f"destination {self.destination}: {method} {self.base_url}{path} answered "
                        f"429 asking to wait {hint:.0f}s (more than "
                        f"{MAX_SERVER_WAIT_SECONDS:.0f}s)"
                    )
            raise _RetryableFailure(f"429 {message}", wait_hint=hint, status=status)
        if status >= 500:
            raise _RetryableFailure(f"{status} {message}", status=status)
        return HttpResult(status=status, body=body, message=message)

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(failure, _RetryableFailure) and failure.wait_hint is not None:
            return failure.wait_hint
        seconds = min(float(self._backoff(retry_state)), self._options.backoff_max)
        if isinstance(failure, _RetryableFailure) and failure.status == 429:
            # A 429 without a hint: back off, and make the sharers back off with us.
            self._limiter.pause(seconds)
        return seconds

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "destination %s: attempt %d/%d failed (%s); retrying in %.2fs",
            self.destination,
            retry_state.attempt_number,
            self._options.max_attempts,
            failure,
            wait,
        )


def _checked_base_url(destination: str, base_url: str) -> str:
    """The base URL without its trailing slash, or a ConfigError naming what is wrong."""
    text = base_url.strip().rstrip("/")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(
            f"destination {destination}: the endpoint {base_url!r} is not an http(s) URL "
            "like 'https://host'"
        )
    return text


def _json_or_none(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def refused(destination: str, what: str, result: HttpResult) -> DestinationError:
    """The error for a refused setup call (check, field lookup): not per-item, so it stops."""
    return DestinationError(
        f"destination {destination}: {what} answered {result.status}: {result.message}"
    )
