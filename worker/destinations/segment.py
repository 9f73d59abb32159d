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

from worker.batching import batch_bounds
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
        rejections: list[Rejection] = []
        indexes: list[int] = []
        parts: list[bytes] = []
        for index, call in enumerate(calls):
            if not call.get("userId") and not call.get("anonymousId"):
                rejections.append(Rejection(index, None, "identify call has no user id"))
                continue
            part = encode_json(call)
            if len(part) > MAX_CALL_BYTES:
                rejections.append(
                    Rejection(
                        index,
                        None,
                        f"call is {len(part)} bytes encoded, over Segment's 32 KB per call",
                    )
                )
                continue
            indexes.append(index)
            parts.append(part)

        for bounds in batch_bounds(
            [len(part) for part in parts],
            max_items=MAX_CALLS_PER_REQUEST,
            max_bytes=MAX_REQUEST_BYTES,
            overhead=len(_HEAD) + len(_TAIL),
        ):
            sent = [indexes[i] for i in bounds]
            body = _HEAD + b",".join(parts[i] for i in bounds) + _TAIL
            result = self._http.send("POST", "/v1/batch", content=body)
            if not result.is_success:
                rejections.extend(result.reject(sent))
        return sorted(rejections, key=lambda rejection: rejection.index)

    def check(self) -> str:
        return (
            f"not checked: a Segment write key cannot be checked without sending events "
            f"(deliveries go to {self._http.base_url}/v1/batch)"
        )

    def close(self) -> None:
        self._http.close()
