"""The `segment` destination: Segment's HTTP Tracking API (or any collector that speaks it).

Identify calls go unchanged to `POST {endpoint}/v1/batch` as `{"batch": [...]}`, with the write
key as the Basic-auth user name. A request holds at most 2,500 calls and stays under the
500 KB batch limit; a call over Segment's 32 KB per-call limit is rejected on its own, unsent.
Segment answers for the whole batch only, so a 2xx accepts every call of it.

`check()` sends nothing: the Tracking API has no endpoint that checks a write key without
recording events, and an empty batch proves nothing on collectors that accept any key. The
first delivery tells (a 401 stops the run).

The host follows the workspace's `region`: an EU workspace writing to the US host gets no
error and its events never appear, so the region is a setting rather than a detail of the
endpoint. `endpoint` (another collector, a proxy) overrides it.
"""

from typing import Any, Literal

from pydantic import SecretStr

from worker.destinations.http import SecretHeaderAuth, api_root, encode_json
from worker.destinations.http_client import NO_USER_ID, BatchRequest, HttpDestinationClient
from worker.destinations.settings import HttpDestinationSettings, RateLimitSetting
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimit

MAX_CALLS_PER_REQUEST = 2_500
# 500 KB per batch request; keep a margin as Segment's own libraries do.
MAX_REQUEST_BYTES = 475_000
# 32 KB per call; counted in decimal kilobytes to stay on the safe side.
MAX_CALL_BYTES = 32_000
_BATCH = BatchRequest("/v1/batch", b'{"batch":[', b"]}")


SEGMENT_HOSTS = {
    "us": "https://api.segment.io",
    "eu": "https://events.eu1.segmentapis.com",
}


class SegmentSettings(HttpDestinationSettings):
    """Segment's HTTP Tracking API, or any collector that speaks it."""

    write_key: SecretStr
    region: Literal["us", "eu"] = "us"
    endpoint: str | None = None
    rate_limit: RateLimitSetting = RateLimit(500)

    @property
    def base_url(self) -> str:
        """`endpoint` when set, else the host of the workspace's region."""
        return self.endpoint or SEGMENT_HOSTS[self.region]


class SegmentDestination(HttpDestinationClient[SegmentSettings]):
    max_batch_items = MAX_CALLS_PER_REQUEST
    max_request_items = MAX_CALLS_PER_REQUEST
    max_request_bytes = MAX_REQUEST_BYTES
    max_call_bytes = MAX_CALL_BYTES
    too_large = "call is {size} bytes encoded, over Segment's 32 KB per call"

    def base_url_for(self, settings: SegmentSettings) -> str:
        return api_root(settings.base_url)

    def auth_for(self, settings: SegmentSettings) -> SecretHeaderAuth:
        return SecretHeaderAuth(header="Authorization", secret=settings.write_key, scheme="basic")

    def batch_request(self, audience: AudienceRef) -> BatchRequest:
        return _BATCH

    def encode(self, audience: AudienceRef, call: dict[str, Any]) -> bytes | str:
        if not (call.get("userId") or call.get("anonymousId")):
            return NO_USER_ID
        return encode_json(call)

    def check(self) -> str:
        return (
            f"not checked: a Segment write key cannot be checked without sending events "
            f"(deliveries go to {self.base_url}/v1/batch)"
        )
