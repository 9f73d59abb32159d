"""The base of the HTTP destination clients: one constructor, batching, and answer handling.

A subclass brings only its wire format (where a batch goes, how one call is encoded and the
bytes around the batch), how it signs requests, and how it reads its answers: the per-item
errors of a 2xx, and the wait a 429 body asks for.
"""

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, TypeVar

import httpx

from worker.batching import encoded_batches
from worker.destinations.base import DestinationClient, Rejection
from worker.destinations.http import (
    DestinationHttpClient,
    HttpOptions,
    HttpResult,
    SecretHeaderAuth,
)
from worker.destinations.settings import HttpDestinationSettings
from worker.payloads import AudienceRef
from worker.ratelimit import BadRequestGuard, LocalRateLimiter, RateLimiter, bad_request_guard

SettingsT = TypeVar("SettingsT", bound=HttpDestinationSettings)

NO_USER_ID = "identify call has no user id"


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """Where a batch of encoded calls is posted, and the bytes around the comma-joined calls."""

    path: str
    head: bytes
    tail: bytes


class HttpDestinationClient(DestinationClient, Generic[SettingsT]):
    """A destination reached over HTTP: the service's calls are encoded, cut into requests
    within the destination's bounds and posted one request at a time (paced and retried by
    `DestinationHttpClient`). A refused request rejects each of its calls; an accepted one
    rejects what `answer_rejections` reads from the answer."""

    # Bounds of one request: calls, and encoded bytes including the batch's head and tail.
    max_request_items: ClassVar[int]
    max_request_bytes: ClassVar[int]
    # The most one encoded call may take; None: whatever fits in a request on its own.
    max_call_bytes: ClassVar[int | None] = None
    # The rejection of a call over those bounds; `{size}` is its encoded size.
    too_large: ClassVar[str]

    def __init__(
        self,
        name: str,
        *,
        settings: SettingsT,
        http: HttpOptions,
        limiter: RateLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
        guard: BadRequestGuard | None = None,
    ) -> None:
        """`limiter` is the pacing shared across processes; with None the client paces
        itself within this process by the settings' `rate_limit`. A destination that names
        its account (`account_for`) is guarded against bad-request bans: by `guard`, else by
        the account's guard kept with the limiter."""
        super().__init__(name)
        self.settings = settings
        account = self.account_for(settings)
        if guard is None and account is not None:
            guard = bad_request_guard(limiter, account)
        self._http = DestinationHttpClient(
            destination=name,
            base_url=self.base_url_for(settings),
            auth=self.auth_for(settings),
            options=http,
            limiter=limiter if limiter is not None else LocalRateLimiter(settings.rate_limit),
            transport=transport,
            body_wait=self.body_wait,
            guard=guard,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def bad_request_guard(self) -> BadRequestGuard | None:
        return self._http.guard

    @abstractmethod
    def base_url_for(self, settings: SettingsT) -> str:
        """The URL every request path is appended to."""

    @abstractmethod
    def auth_for(self, settings: SettingsT) -> SecretHeaderAuth:
        """How the credentials go into each request."""

    def account_for(self, settings: SettingsT) -> str | None:
        """The account the settings reach, for destinations that ban a sender of too many
        refused requests (see `worker.ratelimit.bad_request_guard`); None: no such ban."""
        return None

    @abstractmethod
    def batch_request(self, audience: AudienceRef) -> BatchRequest:
        """Where the audience's calls are posted, and the bytes around them."""

    @abstractmethod
    def encode(self, audience: AudienceRef, call: dict[str, Any]) -> bytes | str:
        """One call in the wire format, or the reason it cannot be sent."""

    @staticmethod
    def answer_rejections(body: Any, sent: Sequence[int]) -> list[Rejection]:
        """The calls an accepted request's answer still rejects (`sent[i]` is the call index
        of the request's item `i`). By default a 2xx accepts every call of the request."""
        return []

    @staticmethod
    def refusal_rejections(result: HttpResult, sent: Sequence[int]) -> list[Rejection]:
        """The calls of a refused request (a 4xx other than 401/403/429): by default every
        one, with the request's status and reason."""
        return result.reject(sent)

    @staticmethod
    def body_wait(body: Any) -> float | None:
        """The wait a 429's body asks for, when the destination names one there."""
        return None

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        audience = replace(audience, field_id=self.prepare(audience))
        request = self.batch_request(audience)
        overhead = len(request.head) + len(request.tail)
        unsendable, batches = encoded_batches(
            [self.encode(audience, call) for call in calls],
            max_items=self.max_request_items,
            max_bytes=self.max_request_bytes,
            max_item_bytes=self.max_call_bytes or self.max_request_bytes - overhead,
            overhead=overhead,
            too_large=lambda size: self.too_large.format(size=size),
        )
        rejections = [Rejection(index, None, reason) for index, reason in unsendable]
        for batch in batches:
            content = batch.join(request.head, request.tail)
            result = self._http.send("POST", request.path, content=content)
            if result.is_success:
                rejections.extend(self.answer_rejections(result.body, batch.indexes))
            else:
                rejections.extend(self.refusal_rejections(result, batch.indexes))
        return sorted(rejections, key=lambda rejection: rejection.index)

    def close(self) -> None:
        self._http.close()
