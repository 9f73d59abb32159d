"""The `ortto-api` destination: Ortto's public REST API, one boolean custom field per audience.

Identify calls become people merged with `POST /v1/person/merge` (at most 100 per request):
`{"fields": {"str::ei": user id, "str::email": email, <field id>: true|false}}`, merged by the
configured `merge_by` fields, overwriting (`merge_strategy` 2), asynchronously.

- The field id is read from Ortto (`/v1/person/custom-field/get`) or created there, by the
  audience key as the field name; an id is never guessed from a name.
- A person carrying none of the `merge_by` fields cannot be merged: anonymous users have no
  user id for `str::ei`, users without email none for `str::email`. Each is rejected on its
  own with the reason; the rest of the batch is sent.
- When Ortto answers per person (`{"people": [{"status", "error"?}]}` aligned with the
  request), a person with an `error` or a status other than `created`/`merged` is rejected.
  `suppressed` is rejected too: Ortto ignored the merge, so the value did not land, and the
  rejection keeps the user visible (and quarantined after repeated refusals) instead of
  silently counted as delivered. Without per-person detail, the whole request was accepted.
- When every person of a request is invalid or suppressed, Ortto refuses the whole request
  (400) and lists each person in `details`: each becomes that person's rejection, with
  Ortto's status and message.
- Ortto bans the sending address after 15 refused requests in 15 s, and a run of suppressed
  people is a run of refused requests: the client's requests pass the account's
  bad-request guard (`worker.ratelimit`), shared by every worker through the rate-limit
  store.
- Ortto answers custom-field/create with `{"name", "field_id", "display_type"}`; the id is
  also read from `id`, at the top level or under `field` (the list's shape).
"""

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, SecretStr

from worker.destinations.base import Rejection
from worker.destinations.http import (
    HttpResult,
    SecretHeaderAuth,
    api_root,
    encode_json,
    refused,
)
from worker.destinations.http_client import BatchRequest, HttpDestinationClient
from worker.destinations.ortto import try_in_seconds
from worker.destinations.settings import HttpDestinationSettings, RateLimitSetting
from worker.errors import ConfigError, DestinationError
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimit, account_id

MAX_PEOPLE_PER_REQUEST = 100
# Ortto refuses payloads over 2 MB; stay well under it.
MAX_REQUEST_BYTES = 1_000_000
# Ortto's limit for a string field.
MAX_STRING_CHARS = 255
ACCEPTED_STATUSES = frozenset({"created", "merged"})
MERGE_STRATEGY_OVERWRITE = 2
FIND_STRATEGY_ANY = 0


ORTTO_API_HOSTS = {
    "default": "https://api.ap3api.com",
    "au": "https://api.au.ap3api.com",
    "eu": "https://api.eu.ap3api.com",
}

MergeField = Literal["str::ei", "str::email"]


class OrttoApiSettings(HttpDestinationSettings):
    """Ortto's public REST API (person merge with one boolean custom field per audience)."""

    api_key: SecretStr
    region: Literal["default", "au", "eu"] = "default"
    merge_by: list[MergeField] = Field(
        default_factory=lambda: list[MergeField](["str::ei"]), min_length=1, max_length=3
    )
    endpoint: str | None = None
    rate_limit: RateLimitSetting = RateLimit(10)

    @property
    def base_url(self) -> str:
        return self.endpoint or ORTTO_API_HOSTS[self.region]


def merge_body_affixes(merge_by: Sequence[str]) -> tuple[bytes, bytes]:
    """The bytes around the encoded people of a merge request."""
    tail = encode_json(
        {
            "merge_by": list(merge_by),
            "merge_strategy": MERGE_STRATEGY_OVERWRITE,
            "find_strategy": FIND_STRATEGY_ANY,
            "async": True,
        }
    )
    return b'{"people":[', b"]," + tail[1:]


def person_fields(
    call: dict[str, Any], audience_key: str, field_id: str, merge_by: Sequence[str]
) -> dict[str, Any] | str:
    """The merge fields of one identify call, or the reason it cannot be merged."""
    traits = call.get("traits") or {}
    value = traits.get(audience_key)
    if not isinstance(value, bool):
        return f"identify call carries no boolean trait {audience_key!r}"
    fields: dict[str, Any] = {}
    user_id = call.get("userId")
    email = traits.get("email")
    if user_id:
        fields["str::ei"] = str(user_id)
    if isinstance(email, str) and email:
        fields["str::email"] = email
    if not any(fields.get(field) for field in merge_by):
        if "str::ei" in merge_by and not user_id:
            hint = " (add str::email to merge_by to merge them by email)" if email else ""
            return (
                "anonymous user: Ortto merges people by str::ei (a user id) and this user has "
                f"none{hint}"
            )
        return f"user has no email, and merge_by is {', '.join(merge_by)}"
    for field in ("str::ei", "str::email"):
        if len(fields.get(field, "")) > MAX_STRING_CHARS:
            return f"{field} is longer than Ortto's {MAX_STRING_CHARS} characters"
    fields[field_id] = value
    return fields


def merge_rejections(body: Any, sent: Sequence[int]) -> list[Rejection]:
    """Per-person rejections from a merge answer; `sent[i]` is the call index of person `i`.

    Detail that does not line up with the request cannot be attributed: an error in it
    rejects the whole request (resending is harmless; a lost update is not), otherwise
    everything counts as accepted.
    """
    people = body.get("people") if isinstance(body, dict) else None
    if not isinstance(people, list) or not people:
        return []
    if len(people) != len(sent):
        problems = [_person_problem(person) for person in people]
        reasons = [problem for problem in problems if problem]
        if not reasons:
            return []
        message = f"Ortto answered for {len(people)} of {len(sent)} people: {reasons[0]}"
        return [Rejection(index, None, message) for index in sent]
    rejections = []
    for index, person in zip(sent, people, strict=True):
        problem = _person_problem(person)
        if problem:
            rejections.append(Rejection(index, None, problem))
    return rejections


def refused_merge_rejections(result: HttpResult, sent: Sequence[int]) -> list[Rejection]:
    """Rejections from a merge Ortto refused as a whole; `sent[i]` is the call index of person
    `i`. When every person was invalid or suppressed, Ortto answers 400 with one `details`
    entry per person, `{"status", "error"}`: each person is rejected with its own reason.
    Otherwise every person gets the request's reason."""
    details = result.body.get("details") if isinstance(result.body, dict) else None
    if not isinstance(details, list) or len(details) != len(sent):
        return result.reject(sent)
    rejections = []
    for index, detail in zip(sent, details, strict=True):
        if not isinstance(detail, dict):
            return result.reject(sent)
        status, error = detail.get("status"), detail.get("error")
        reason = f"{status}: {error}" if status and error else str(status or error or "")
        rejections.append(Rejection(index, result.status, (reason or result.message)[:500]))
    return rejections


def _person_problem(person: Any) -> str | None:
    if not isinstance(person, dict):
        return f"unreadable answer from Ortto: {person!r}"[:500]
    error = person.get("error")
    if error:
        return f"rejected by Ortto: {error}"[:500]
    status = person.get("status")
    if status == "suppressed":
        return "suppressed by Ortto: the person is on its suppression list; value not stored"
    if status not in ACCEPTED_STATUSES:
        return f"Ortto answered status {status!r} for this person"[:500]
    return None


def field_id_from(entry: Any) -> tuple[str, str] | None:
    """(id, name) of a custom field description: the create answer's
    `{"name", "field_id", "display_type"}`, or `{"id", "name", ...}` at the top level or
    nested under `field` (the list's entries)."""
    if not isinstance(entry, dict):
        return None
    inner = entry.get("field")
    if isinstance(inner, dict):
        entry = inner
    field_id, name = entry.get("field_id") or entry.get("id"), entry.get("name")
    if isinstance(field_id, str) and field_id and isinstance(name, str):
        return field_id, name
    return None


class OrttoApiDestination(HttpDestinationClient[OrttoApiSettings]):
    max_batch_items = 500
    max_request_items = MAX_PEOPLE_PER_REQUEST
    max_request_bytes = MAX_REQUEST_BYTES
    too_large = "person too large for one request"
    answer_rejections = staticmethod(merge_rejections)
    refusal_rejections = staticmethod(refused_merge_rejections)
    body_wait = staticmethod(try_in_seconds)

    @property
    def merge_by(self) -> list[MergeField]:
        return self.settings.merge_by

    @cached_property
    def _field_ids(self) -> dict[str, str]:
        """Field ids this client found or created, by audience key."""
        return {}

    def base_url_for(self, settings: OrttoApiSettings) -> str:
        return api_root(settings.base_url)

    def auth_for(self, settings: OrttoApiSettings) -> SecretHeaderAuth:
        return SecretHeaderAuth(header="X-Api-Key", secret=settings.api_key, scheme="plain")

    def account_for(self, settings: OrttoApiSettings) -> str:
        return account_id(settings.api_key.get_secret_value())

    def prepare(self, audience: AudienceRef) -> str:
        """The id of the audience's boolean custom field, found by name or created."""
        if audience.field_id:
            return audience.field_id
        cached = self._field_ids.get(audience.key)
        if cached:
            return cached
        field_id = self._find_field(audience.key)
        if field_id is None:
            field_id = self._create_field(audience.key)
        self._field_ids[audience.key] = field_id
        return field_id

    def batch_request(self, audience: AudienceRef) -> BatchRequest:
        head, tail = merge_body_affixes(self.merge_by)
        return BatchRequest("/v1/person/merge", head, tail)

    def encode(self, audience: AudienceRef, call: dict[str, Any]) -> bytes | str:
        # deliver() has prepared the audience, so its field id is known.
        fields = person_fields(call, audience.key, str(audience.field_id), self.merge_by)
        return fields if isinstance(fields, str) else encode_json({"fields": fields})

    def check(self) -> str:
        result = self._list_fields()
        if not result.is_success:
            raise refused(self.name, "POST /v1/person/custom-field/get", result)
        fields = result.body.get("fields") if isinstance(result.body, dict) else None
        count = len(fields) if isinstance(fields, list) else 0
        return f"Ortto accepted the API key ({count} custom person fields)"

    def _list_fields(self) -> HttpResult:
        return self._http.send("POST", "/v1/person/custom-field/get")

    def _find_field(self, name: str) -> str | None:
        result = self._list_fields()
        if not result.is_success:
            raise refused(self.name, "POST /v1/person/custom-field/get", result)
        entries = result.body.get("fields") if isinstance(result.body, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            found = field_id_from(entry)
            if found and found[1] == name:
                field_id = found[0]
                if not field_id.startswith("bol:"):
                    raise ConfigError(
                        f"destination {self.name}: Ortto already has a custom person field "
                        f"named {name!r} ({field_id}) that is not a boolean; rename that field "
                        "in Ortto or give the audience another key"
                    )
                return field_id
        return None

    def _create_field(self, name: str) -> str:
        result = self._http.send(
            "POST",
            "/v1/person/custom-field/create",
            content=encode_json({"name": name, "type": "bool"}),
        )
        found = field_id_from(result.body) if result.is_success else None
        if found:
            return found[0]
        # Another worker may have created it meanwhile (Ortto refuses duplicate names), or the
        # answer did not describe the field: read it back rather than guess its id.
        field_id = self._find_field(name)
        if field_id is not None:
            return field_id
        if not result.is_success:
            raise refused(self.name, f"creating the custom field {name!r}", result)
        raise DestinationError(
            f"destination {self.name}: Ortto created the custom field {name!r} but neither its "
            "answer nor the field list gives its id"
        )
