"""The `ortto` destination: Ortto's Segment endpoint, the one Segment's Ortto destination calls.

Each Segment-spec identify call becomes one contact of a JSON array
`POST {base}/identify` (at most 500 contacts and well under Ortto's 2 MB per request);
Ortto answers `{"errors": [{"status", "message", "index"}]}` and every contact not listed
was accepted.

Endpoint rule: without `endpoint`, the base is derived from the API key
(`https://segment-action-api-{region}.ortto.app/v1`). A configured `endpoint` is the
server root and the client appends `/v1` (an endpoint already ending in `/v1` is taken as
is), the same rule as the other HTTP destinations, whose paths all start at `/v1`.
"""

from collections.abc import Sequence
from typing import Any

import httpx

from worker.batching import encoded_batches
from worker.destinations.base import Destination, Rejection
from worker.destinations.http import (
    DestinationHttpClient,
    HttpOptions,
    SecretHeaderAuth,
    api_root,
    encode_json,
    limiter_or_local,
    refused,
)
from worker.destinations.settings import OrttoSettings, ortto_segment_base_url
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimiter

MAX_CONTACTS_PER_REQUEST = 500
# Ortto refuses payloads over 2 MB; stay well under it.
MAX_REQUEST_BYTES = 1_000_000
_ARRAY_OVERHEAD = len(b"[]")


def ortto_identify_base_url(settings: OrttoSettings) -> str:
    """`{root}/v1` for a configured endpoint, else the base derived from the key."""
    if settings.endpoint:
        return api_root(settings.endpoint) + "/v1"
    return ortto_segment_base_url(settings.api_key.get_secret_value())


def ortto_contact(call: dict[str, Any]) -> dict[str, Any]:
    """One identify call as an Ortto contact; absent ids are left out rather than sent null."""
    contact = {
        "user_id": call.get("userId"),
        "anonymous_id": call.get("anonymousId"),
        "traits": call.get("traits") or {},
        "timestamp": call.get("timestamp"),
        "message_id": call.get("messageId"),
    }
    return {key: value for key, value in contact.items() if value is not None}


def identify_rejections(body: Any, sent: Sequence[int]) -> list[Rejection]:
    """Rejections from Ortto's `errors` list; `sent[i]` is the call index of array item `i`.

    An error Ortto does not tie to a valid index rejects the whole request: counting an
    unknown failure as delivered would lose the update, while resending is harmless.
    """
    errors = body.get("errors") if isinstance(body, dict) else None
    if not errors:
        return []
    if not isinstance(errors, list):
        return [Rejection(i, None, f"unreadable errors from Ortto: {errors!r}"[:500]) for i in sent]
    found: dict[int, Rejection] = {}
    for entry in errors:
        entry = entry if isinstance(entry, dict) else {"message": str(entry)}
        status = entry.get("status")
        status = status if isinstance(status, int) and not isinstance(status, bool) else None
        message = str(entry.get("message") or "rejected by Ortto")[:500]
        index = entry.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(sent):
            return [
                Rejection(i, status, f"Ortto reported an error for no known contact: {message}")
                for i in sent
            ]
        found[sent[index]] = Rejection(sent[index], status, message)
    return [found[i] for i in sorted(found)]


class OrttoDestination(Destination):
    type = "ortto"
    max_batch_items = MAX_CONTACTS_PER_REQUEST

    def __init__(
        self,
        name: str,
        *,
        settings: OrttoSettings,
        http: HttpOptions,
        limiter: RateLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(name)
        self._http = DestinationHttpClient(
            destination=name,
            base_url=ortto_identify_base_url(settings),
            auth=SecretHeaderAuth(header="Authorization", secret=settings.api_key, scheme="bearer"),
            options=http,
            limiter=limiter_or_local(limiter, settings.rate_limit),
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        unsendable, batches = encoded_batches(
            [
                encode_json(ortto_contact(call))
                if call.get("userId") or call.get("anonymousId")
                else "identify call has no user id"
                for call in calls
            ],
            max_items=MAX_CONTACTS_PER_REQUEST,
            max_bytes=MAX_REQUEST_BYTES,
            max_item_bytes=MAX_REQUEST_BYTES - _ARRAY_OVERHEAD,
            overhead=_ARRAY_OVERHEAD,
            too_large=lambda size: (
                f"contact is {size} bytes encoded, over the {MAX_REQUEST_BYTES} "
                "bytes sent per request"
            ),
        )
        rejections = [Rejection(index, None, reason) for index, reason in unsendable]
        for batch in batches:
            result = self._http.send("POST", "/identify", content=batch.join(b"[", b"]"))
            if result.is_success:
                rejections.extend(identify_rejections(result.body, batch.indexes))
            else:
                rejections.extend(result.reject(batch.indexes))
        return sorted(rejections, key=lambda rejection: rejection.index)

    def check(self) -> str:
        result = self._http.send("GET", "/me")
        if not result.is_success:
            raise refused(self.name, "GET /me", result)
        return f"Ortto accepted the API key ({self.base_url})"

    def close(self) -> None:
        self._http.close()
