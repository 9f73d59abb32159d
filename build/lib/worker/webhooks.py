"""Posting alerts to webhooks: one JSON POST, retried on transient failures (transport
errors, timeouts, 429, 5xx) with exponential backoff, at most `attempts` times. A 4xx
answer is final. The URL is a secret (Slack's carries its token): it never appears in a
message this module builds."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import tenacity

# Bounds that keep a dead webhook from holding a process for long: about 20 s at worst.
ATTEMPTS = 3
CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 5.0
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 4.0
MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class PostOutcome:
    """How one alert's posting ended."""

    is_delivered: bool
    attempts: int
    status: int | None  # the last answer's HTTP status (None: no answer)
    error: str | None


class _Transient(Exception):
    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.status = status


class WebhookPoster:
    """Posts JSON documents; keyword-only, with an injectable transport and sleep."""

    def __init__(
        self,
        *,
        attempts: int = ATTEMPTS,
        backoff_base: float = BACKOFF_BASE_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._attempts = attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._transport = transport
        self._sleep = sleep

    def post(self, url: str, document: dict[str, Any]) -> PostOutcome:
        """Post `document` to `url`; never raises."""
        attempts = 0
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=tenacity.wait_exponential(multiplier=self._backoff_base, max=self._backoff_max),
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        timeout = httpx.Timeout(READ_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
        try:
            with httpx.Client(timeout=timeout, transport=self._transport) as client:
                for attempt in retrying:
                    with attempt:
                        attempts += 1
                        status = self._post_once(client, url, document)
            return PostOutcome(True, attempts, status, None)
        except _Transient as exc:
            return PostOutcome(False, attempts, exc.status, str(exc))
        except _Refused as exc:
            return PostOutcome(False, attempts, exc.status, str(exc))

    @staticmethod
    def _post_once(client: httpx.Client, url: str, document: dict[str, Any]) -> int:
        try:
            response = client.post(url, json=document)
        except httpx.TimeoutException:
            raise _Transient("the webhook did not answer in time", None) from None
        except httpx.HTTPError as exc:
            # The exception's text can repeat the URL: name only its kind.
            raise _Transient(f"cannot reach the webhook ({type(exc).__name__})", None) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Transient(f"the webhook answered {status}: {_body(response)}", status)
        if status >= 400:
            raise _Refused(f"the webhook refused the alert ({status}): {_body(response)}", status)
        return status


class _Refused(Exception):
    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.status = status


def _body(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    return text[:MAX_ERROR_CHARS] or "(empty body)"
