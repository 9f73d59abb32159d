"""Per-type destination settings, validated at `apply` and again when a run builds a client."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from worker.ratelimit import parse_rate_limit

# Fields that hold credentials: they must come from `${VAR}` and are never stored resolved.
SECRET_FIELDS = frozenset({"api_key", "write_key"})


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("rate_limit", check_fields=False)
    @classmethod
    def _rate_limit_parses(cls, value: str) -> str:
        parse_rate_limit(value)
        return value


class FileSettings(_Settings):
    type: Literal["file"]
    path: str


def ortto_segment_base_url(api_key: str) -> str:
    """Base URL of Ortto's Segment endpoint, derived from the key (`pau-...` -> region au)."""
    if len(api_key) < 5 or api_key[3] != "-" or not api_key[1:3].isalpha():
        raise ValueError(
            "the Ortto API key is malformed: it should look like 'pau-...' (a letter, a two-"
            "letter region, a dash); copy it again from Ortto's Segment integration"
        )
    region = api_key[1:3].lower()
    domain = "ortto-stg.app" if api_key[0] == "s" else "ortto.app"
    return f"https://segment-action-api-{region}.{domain}/v1"


class OrttoSettings(_Settings):
    """Ortto's Segment endpoint (what Segment's Ortto destination talks to)."""

    type: Literal["ortto"]
    api_key: SecretStr
    endpoint: str | None = None
    rate_limit: str = "10/s"

    @field_validator("api_key")
    @classmethod
    def _key_is_well_formed(cls, value: SecretStr) -> SecretStr:
        ortto_segment_base_url(value.get_secret_value())
        return value


ORTTO_API_HOSTS = {
    "default": "https://api.ap3api.com",
    "au": "https://api.au.ap3api.com",
    "eu": "https://api.eu.ap3api.com",
}


MergeField = Literal["str::ei", "str::email"]


class OrttoApiSettings(_Settings):
    """Ortto's public REST API (person merge with one boolean custom field per audience)."""

    type: Literal["ortto-api"]
    api_key: SecretStr
    region: Literal["default", "au", "eu"] = "default"
    merge_by: list[MergeField] = Field(
        default_factory=lambda: list[MergeField](["str::ei"]), min_length=1, max_length=3
    )
    endpoint: str | None = None
    rate_limit: str = "10/s"

    @property
    def base_url(self) -> str:
        return self.endpoint or ORTTO_API_HOSTS[self.region]


class SegmentSettings(_Settings):
    """Segment's HTTP Tracking API, or any collector that speaks it."""

    type: Literal["segment"]
    write_key: SecretStr
    endpoint: str = "https://api.segment.io"
    rate_limit: str = "500/s"


DestinationSettings = Annotated[
    FileSettings | OrttoSettings | OrttoApiSettings | SegmentSettings,
    Field(discriminator="type"),
]
DESTINATION_TYPES = ("file", "ortto", "ortto-api", "segment")
