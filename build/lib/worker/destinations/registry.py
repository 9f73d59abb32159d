"""The destination types: the only place a type is named, each type's settings class mapped to
its client class; the one path from a destination's `${VAR}` template to its typed, validated
settings (used by `apply` and by the client pool); building a client from those settings.

A new type is a module with its settings and client classes, and one line in
`DESTINATION_TYPES`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import ValidationError

from worker.destinations.base import DestinationClient
from worker.destinations.file import FileDestination, FileSettings
from worker.destinations.http import HttpOptions
from worker.destinations.ortto import OrttoDestination, OrttoSettings
from worker.destinations.ortto_api import OrttoApiDestination, OrttoApiSettings
from worker.destinations.segment import SegmentDestination, SegmentSettings
from worker.destinations.settings import DestinationSettings, Loc, describe_error
from worker.envrefs import has_env_ref, resolve_env
from worker.errors import ConfigError
from worker.ratelimit import RateLimiter

__all__ = [
    "DESTINATION_TYPES",
    "DestinationSettingsError",
    "DestinationType",
    "HttpOptions",
    "build_client",
    "resolve_settings",
]

SettingsT = TypeVar("SettingsT", bound=DestinationSettings)
SettingsT_contra = TypeVar("SettingsT_contra", bound=DestinationSettings, contravariant=True)


class ClientFactory(Protocol[SettingsT_contra]):
    def __call__(
        self,
        name: str,
        *,
        settings: SettingsT_contra,
        http: HttpOptions,
        limiter: RateLimiter | None,
    ) -> DestinationClient: ...


@dataclass(frozen=True, slots=True)
class DestinationType(Generic[SettingsT]):
    settings: type[SettingsT]
    client: ClientFactory[SettingsT]


DESTINATION_TYPES: Mapping[str, DestinationType[Any]] = {
    "file": DestinationType(FileSettings, FileDestination),
    "ortto": DestinationType(OrttoSettings, OrttoDestination),
    "ortto-api": DestinationType(OrttoApiSettings, OrttoApiDestination),
    "segment": DestinationType(SegmentSettings, SegmentDestination),
}
_BY_SETTINGS = {kind.settings: kind for kind in DESTINATION_TYPES.values()}


class DestinationSettingsError(ConfigError):
    """A destination's settings are wrong: `where` names the destination, `loc` the key
    (so a caller holding the file can name its line), `reason` what to fix."""

    def __init__(self, where: str, loc: Loc, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.loc = loc
        self.reason = reason


def resolve_settings(
    name: str, template: Mapping[str, Any], env: Mapping[str, str]
) -> DestinationSettings:
    """A destination's typed, validated settings from its stored template, its `${VAR}`
    references resolved from `env`. Raises DestinationSettingsError on a bad setting, and
    ConfigError on a variable that is not set."""
    where = f"destinations.{name}"
    kind = template.get("type")
    entry = DESTINATION_TYPES.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise DestinationSettingsError(
            where,
            ("type",),
            f"unknown destination type {kind!r}; use one of {', '.join(DESTINATION_TYPES)}",
        )
    for field in sorted(entry.settings.secret_fields() & template.keys()):
        if not has_env_ref(str(template[field])):
            raise DestinationSettingsError(
                f"{where}.{field}",
                (field,),
                f"write it as an environment reference such as "
                f"'${{{name.upper().replace('-', '_')}_{field.upper()}}}'; secrets are never "
                "stored in the state database",
            )
    values = {key: value for key, value in template.items() if key != "type"}
    resolved = resolve_env(values, env, where)
    try:
        settings: DestinationSettings = entry.settings.model_validate(resolved)
    except ValidationError as exc:
        loc, reason = describe_error(exc, hide_input=True)
        raise DestinationSettingsError(where, loc, reason) from None
    return settings


def build_client(
    name: str, settings: DestinationSettings, *, http: HttpOptions, limiter: RateLimiter | None
) -> DestinationClient:
    """The client for one destination. `limiter` is the pacing shared across processes; with
    None, an HTTP destination paces itself within this process by its `rate_limit`."""
    kind = _BY_SETTINGS.get(type(settings))
    if kind is None:
        raise TypeError(f"{type(settings).__name__} is not the settings of a destination type")
    return kind.client(name, settings=settings, http=http, limiter=limiter)
