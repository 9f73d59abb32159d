"""The `ortto` destination: Ortto's Segment endpoint, the one Segment's Ortto destination calls.

Each Segment-spec identify call becomes one contact of a JSON array
`POST {base}/identify` (at most 500 contacts and well under Ortto's 2 MB per request);
Ortto answers `{"errors": [{"status", "message", "index"}]}` and every contact not listed
was accepted. A 429 names its wait in the body: `{"error": {"try-in-seconds": N}}`.

Endpoint rule: without `endpoint`, the base is derived from the API key
(`https://segment-action-api-{region}.ortto.app/v1`). A configured `endpoint` is the
server root and the client appends `/v1` (an endpoint already ending in `/v1` is taken as
is), the same rule as the other HTTP destinations, whose paths all start at `/v1`.
"""

from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr, field_validator

from worker.destinations.base import Rejection
from worker.destinations.http import SecretHeaderAuth, api_root, encode_json, refused
from worker.destinations.http_client import NO_USER_ID, BatchRequest, HttpDestinationClient
from worker.destinations.settings import HttpDestinationSettings, RateLimitSetting
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimit

MAX_CONTACTS_PER_REQUEST = 500
# Ortto refuses payloads over 2 MB; stay well under it.
MAX_REQUEST_BYTES = 1_000_000


class OrttoSettings(HttpDestinationSettings):
    """Ortto's Segment endpoint (what Segment's Ortto destination talks to)."""

    api_key: SecretStr
    endpoint: str | None = None
    rate_limit: RateLimitSetting = RateLimit(10)

    @field_validator("api_key")
    @classmethod
    def _key_is_well_formed(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value()
        if len(key) < 5 or key[3] != "-" or not key[1:3].isalpha():
            raise ValueError(
                "the Ortto API key is malformed: it should look like 'pau-...' (a letter, a two-"
                "letter region, a dash); copy it again from Ortto's Segment integration"
            )
        return value


def ortto_identify_base_url(settings: OrttoSettings) -> str:
    """`{root}/v1` for a configured endpoint, else the base derived from the (validated) key:
    `pau-...` is region au, and a leading `s` is Ortto's staging."""
    if settings.endpoint:
        return api_root(settings.endpoint) + "/v1"
    key = settings.api_key.get_secret_value()
    domain = "ortto-stg.app" if key[0] == "s" else "ortto.app"
    return f"https://segment-action-api-{key[1:3].lower()}.{domain}/v1"


def try_in_seconds(body: Any) -> float | None:
    """The wait an Ortto 429 names in its body, `{"error": {"try-in-seconds": N}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    seconds = error.get("try-in-seconds") if isinstance(error, dict) else None
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        return max(0.0, float(seconds))
    return None


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


class OrttoDestination(HttpDestinationClient[OrttoSettings]):
    max_batch_items = MAX_CONTACTS_PER_REQUEST
    max_request_items = MAX_CONTACTS_PER_REQUEST
    max_request_bytes = MAX_REQUEST_BYTES
    too_large = (
        f"contact is {{size}} bytes encoded, over the {MAX_REQUEST_BYTES} bytes sent per request"
    )
    answer_rejections = staticmethod(identify_rejections)
    body_wait = staticmethod(try_in_seconds)

    def base_url_for(self, settings: OrttoSettings) -> str:
        return ortto_identify_base_url(settings)

    def auth_for(self, settings: OrttoSettings) -> SecretHeaderAuth:
        return SecretHeaderAuth(header="Authorization", secret=settings.api_key, scheme="bearer")

    def batch_request(self, audience: AudienceRef) -> BatchRequest:
        return BatchRequest("/identify", b"[", b"]")

    def encode(self, audience: AudienceRef, call: dict[str, Any]) -> bytes | str:
        if not (call.get("userId") or call.get("anonymousId")):
            return NO_USER_ID
        return encode_json(ortto_contact(call))

    def check(self) -> str:
        result = self._http.send("GET", "/me")
        if not result.is_success:
            raise refused(self.name, "GET /me", result)
        return f"Ortto accepted the API key ({self.base_url})"
