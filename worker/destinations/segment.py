"""The `segment` destination: Segment's HTTP Tracking API (or any collector that speaks it).

Identify calls go unchanged to `POST {endpoint}/v1/batch` as `{"batch": [...]}`, with the write
key as the Basic-auth user name. A request holds at most 2,500 calls and stays under the
500 KB batch limit; a call over Segment's 32 KB per-call limit is rejected on its own, unsent.
Segment answers for the whole batch only, so a 2xx accepts every call of it.

`check()` sends nothing: the Tracking API has no endpoint that checks a write key without
recording events, and an empty batch proves nothing on collectors that accept any key. The
first delivery tells (a 401 stops the run).
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
)
from worker.destinations.settings import SegmentSettings
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimiter

MAX_CALLS_PER_REQUEST = 2_500
# 500 KB per batch request; keep a margin as Segment's own libraries do.
MAX_REQUEST_BYTES = 475_000
# 32 KB per call; counted in decimal kilobytes to stay on the safe side.
MAX_CALL_BYTES = 32_000
_HEAD, _TAIL = b'{"batch":[', b"]}"


class SegmentDestination(Destination):
    type = "segment"
    max_batch_items = MAX_CALLS_PER_REQUEST

    def __init__(
        self,
        name: str,
        *,
        settings: SegmentSettings,
        http: HttpOptions,
        limiter: RateLimiter | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(name)
        self._http = DestinationHttpClient(
            destination=name,
            base_url=api_root(settings.endpoint),
            auth=SecretHeaderAuth(
                header="Authorization", secret=settings.write_key, scheme="basic"
            ),
            options=http,
            limiter=limiter_or_local(limiter, settings.rate_limit),
            transport=transport,
        )

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        unsendable, batches = encoded_batches(
            [
                encode_json(call)
                if call.get("userId") or call.get("anonymousId")
                else "identify call has no user id"
                for call in calls
            ],
            max_items=MAX_CALLS_PER_REQUEST,
            max_bytes=MAX_REQUEST_BYTES,
            max_item_bytes=MAX_CALL_BYTES,
            overhead=len(_HEAD) + len(_TAIL),
            too_large=lambda size: f"call is {size} bytes encoded, over Segment's 32 KB per call",
        )
        rejections = [Rejection(index, None, reason) for index, reason in unsendable]
        for batch in batches:
            result = self._http.send("POST", "/v1/batch", content=batch.join(_HEAD, _TAIL))
            if not result.is_success:
                rejections.extend(result.reject(batch.indexes))
        return sorted(rejections, key=lambda rejection: rejection.index)

    def check(self) -> str:
        return (
            f"not checked: a Segment write key cannot be checked without sending events "
            f"(deliveries go to {self._http.base_url}/v1/batch)"
        )

    def close(self) -> None:
        self._http.close()
