"""The base of every destination type's settings, and the setting types they share.

Each type's settings class lives with its client (see `registry` for the mapping); values are
resolved and validated once, by `registry.resolve_settings`, and passed down typed.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainValidator, SecretStr, ValidationError
from pydantic_core import PydanticCustomError

from worker.errors import ConfigError
from worker.ratelimit import RateLimit, parse_rate_limit

# Where in a settings mapping a problem is: keys and list positions.
Loc = tuple[int | str, ...]
# The error type of a setting whose own parser wrote the message; the message names the field.
SETTING_ERROR = "setting"


def _rate_limit(value: Any) -> RateLimit:
    if isinstance(value, RateLimit):
        return value
    try:
        return parse_rate_limit(value)
    except ConfigError as exc:
        raise PydanticCustomError(SETTING_ERROR, "{reason}", {"reason": str(exc)}) from None


# Written `10/s` or `600/m`; held parsed.
RateLimitSetting = Annotated[RateLimit, PlainValidator(_rate_limit)]


class DestinationSettings(BaseModel):
    """One destination's settings, `${VAR}` references resolved. Fields typed SecretStr are
    credentials: the file must write them as `${VAR}`, and they are never stored resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def secret_fields(cls) -> frozenset[str]:
        return frozenset(
            name for name, field in cls.model_fields.items() if field.annotation is SecretStr
        )


class HttpDestinationSettings(DestinationSettings):
    """Settings of a destination reached over HTTP: paced by its `rate_limit`."""

    rate_limit: RateLimitSetting


def describe_error(exc: ValidationError, *, hide_input: bool = False) -> tuple[Loc, str]:
    """The location of a validation error's first problem, and a sentence saying it."""
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    # "[key]" marks an error in a mapping's key (a name) rather than in its value.
    location = ".".join(str(part) for part in loc if part != "[key]")
    if error["type"] == "extra_forbidden":
        return loc, f"unknown key {location!r}"
    message = error["msg"]
    if error["type"] == SETTING_ERROR:
        return loc, message
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    if not hide_input and "input" in error and error["type"] != "missing":
        message += f" (got {error['input']!r})"
    return loc, f"{location}: {message}" if location else message
