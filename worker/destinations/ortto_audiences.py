"""The `ortto-audiences` destination: native Ortto audiences, as Segment's "Ortto (Audiences)"
destination keeps them, on Ortto's Segment endpoint (same base URL and Bearer key as `ortto`).

- Each (audience, destination) pair has one Ortto audience, created once with
  `POST {base}/audiences/create {"name"}` (the pair's `ortto_audience_name`, else the
  audience's name); Ortto answers `{"id", ...}` and the id is stored on the pair.
- Before each run, `POST {base}/audiences/get {"id"}` checks Ortto still has it. An audience
  Ortto no longer has (404, or an answer for another id) is created again, with a WARNING;
  the new id differs from the stored one, which makes the run send every member (full).
- Membership: `PUT {base}/audiences/members`, a JSON array of up to 500
  `{"message_id", "user_id"|"anonymous_id", "audience": {"mode": "add"|"remove", "id"},
  "traits": {"email"?}}`: the audience's own boolean becomes the mode and is not sent as a
  trait. Ortto answers `{"errors": [{"status", "message", "index"}]}` as for identify.
"""

import logging
from typing import Any, ClassVar

from worker.destinations.http import encode_json, refused
from worker.destinations.http_client import NO_USER_ID, BatchRequest
from worker.destinations.ortto import OrttoDestination, OrttoSettings
from worker.errors import DestinationError
from worker.payloads import AudienceRef

log = logging.getLogger(__name__)

MAX_MEMBERS_PER_REQUEST = 500
_MEMBERS = BatchRequest("/audiences/members", b"[", b"]", method="PUT")


class OrttoAudiencesSettings(OrttoSettings):
    """Ortto's Segment endpoint, keeping one native Ortto audience per audience."""

    # Membership only: an audience is an Ortto audience here, never an event.
    accepts_track: ClassVar[bool] = False
    keeps_native_audiences: ClassVar[bool] = True


def audience_member(call: dict[str, Any], audience_id: str, key: str) -> dict[str, Any] | str:
    """One identify call as a member update of the Ortto audience `audience_id`, or the
    reason it cannot be sent. The boolean `key` becomes the mode; other traits (the email)
    are sent as traits."""
    traits = dict(call.get("traits") or {})
    value = traits.pop(key, None)
    if not isinstance(value, bool):
        return f"identify call carries no boolean trait {key!r}"
    member = {
        "message_id": call.get("messageId"),
        "user_id": call.get("userId"),
        "anonymous_id": call.get("anonymousId"),
        "audience": {"mode": "add" if value else "remove", "id": audience_id},
        "traits": traits,
    }
    return {name: item for name, item in member.items() if item is not None}


def audience_id_from(body: Any) -> str | None:
    """The id in Ortto's answer to audiences/create or audiences/get, `{"id", ...}`."""
    found = body.get("id") if isinstance(body, dict) else None
    return found if isinstance(found, str) and found else None


class OrttoAudiencesDestination(OrttoDestination):
    max_batch_items = MAX_MEMBERS_PER_REQUEST
    max_request_items = MAX_MEMBERS_PER_REQUEST
    too_large = "member update is {size} bytes encoded, over the bytes sent per request"

    def prepare(self, audience: AudienceRef) -> str:
        """The id of the pair's Ortto audience: the stored one while Ortto still has it, else
        a newly created one."""
        if audience.field_id:
            if self._exists(audience.field_id):
                return audience.field_id
            name = self._name(audience)
            created = self._create(name)
            log.warning(
                "destination %s: Ortto no longer has the audience %r (id %s) of %s; created "
                "it again (id %s), and this run sends every member",
                self.name,
                name,
                audience.field_id,
                audience.key,
                created,
            )
            return created
        return self._create(self._name(audience))

    def prepared_audience(self, audience: AudienceRef) -> AudienceRef:
        # A run has prepared the pair (checked or created its Ortto audience) before
        # delivering; only a bare call (no id yet) needs it here.
        return audience if audience.field_id else super().prepared_audience(audience)

    def batch_request(self, audience: AudienceRef) -> BatchRequest:
        return _MEMBERS

    def batch_request_for(self, audience: AudienceRef, call: dict[str, Any]) -> BatchRequest:
        return _MEMBERS

    def encode(self, audience: AudienceRef, call: dict[str, Any]) -> bytes | str:
        if not (call.get("userId") or call.get("anonymousId")):
            return NO_USER_ID
        member = audience_member(call, str(audience.field_id), audience.key)
        return member if isinstance(member, str) else encode_json(member)

    @staticmethod
    def _name(audience: AudienceRef) -> str:
        return audience.external_name or audience.name

    def _exists(self, audience_id: str) -> bool:
        result = self._http.send("POST", "/audiences/get", content=encode_json({"id": audience_id}))
        if result.status == 404:
            return False
        if not result.is_success:
            raise refused(self.name, f"checking the Ortto audience {audience_id!r}", result)
        return audience_id_from(result.body) == audience_id

    def _create(self, name: str) -> str:
        result = self._http.send("POST", "/audiences/create", content=encode_json({"name": name}))
        if not result.is_success:
            raise refused(self.name, f"creating the Ortto audience {name!r}", result)
        created = audience_id_from(result.body)
        if created is None:
            raise DestinationError(
                f"destination {self.name}: Ortto created the audience {name!r} but its answer "
                "gives no id"
            )
        return created
