"""Loading `audiences.yml`: YAML with line numbers, `${VAR}` interpolation, validation.

Destination settings are checked by the destination registry (the same path a run takes);
this module adds the file's line numbers to what it reports.

The result is a plain `Config` value; nothing here touches the state database.
"""

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlparse
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlparse import tokens as sql_tokens

from worker.destinations.registry import DestinationSettingsError, resolve_settings
from worker.destinations.settings import describe_error
from worker.domain import AlertEvent
from worker.envrefs import has_env_ref, resolve_env
from worker.errors import ConfigError
from worker.keys import audience_key, validate_pinned_key
from worker.scheduling import DEFAULT_SCHEDULE, parse_schedule


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class SourceModel(_Strict):
    url: str = Field(min_length=1)
    statement_timeout: float = Field(default=300.0, gt=0, description="seconds")


class AudienceModel(_Strict):
    name: str = Field(min_length=1, max_length=200)
    key: str | None = None
    source: str
    query: str = Field(min_length=1)
    schedule: str = DEFAULT_SCHEDULE
    destinations: list[str] = Field(min_length=1)
    max_exit_fraction: float = Field(default=0.5, gt=0, le=1)


# Source and destination names: the state database keeps at most 100 characters.
Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class AlertModel(_Strict):
    name: Name
    url: str = Field(min_length=1)
    on: list[AlertEvent] = Field(default_factory=lambda: list(AlertEvent), min_length=1)
    audiences: list[str] | None = None


class ConfigModel(_Strict):
    sources: dict[Name, SourceModel] = Field(default_factory=dict)
    destinations: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    audiences: list[AudienceModel] = Field(default_factory=list)
    alerts: list[AlertModel] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    name: str
    url: str  # template: `${VAR}` references kept, resolved at run time
    statement_timeout_seconds: float


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    name: str
    type: str
    settings: dict[str, Any]  # template


@dataclass(frozen=True, slots=True)
class AudienceSpec:
    key: str
    name: str
    is_key_pinned: bool
    source: str
    query: str
    schedule: str
    destinations: tuple[str, ...]
    max_exit_fraction: float


@dataclass(frozen=True, slots=True)
class AlertSpec:
    """A webhook of the `alerts:` section."""

    name: str
    url: str  # template: `${VAR}` references kept, resolved when an alert is sent
    events: tuple[AlertEvent, ...]
    audience_keys: tuple[str, ...] | None  # None: every audience


@dataclass(frozen=True, slots=True)
class Config:
    sources: tuple[SourceSpec, ...]
    destinations: tuple[DestinationSpec, ...]
    audiences: tuple[AudienceSpec, ...]
    alerts: tuple[AlertSpec, ...] = ()


def check_destination(
    name: str,
    template: Mapping[str, Any],
    env: Mapping[str, str],
    root: yaml.Node | None,
    path: Path | None = None,
) -> None:
    """Resolve and validate one destination's settings as a run will; errors name the file
    `path` and the line of its YAML `root`."""
    try:
        resolve_settings(name, template, env)
    except DestinationSettingsError as exc:
        number = _line_of(root, ("destinations", name, *exc.loc)) if root is not None else None
        line = f" (line {number})" if number else ""
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc.where}{line}: {exc.reason}") from None


def resolve_source_url(name: str, template: str, env: Mapping[str, str]) -> str:
    url = str(resolve_env(template, env, f"sources.{name}.url"))
    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"sources.{name}.url is not a database URL (expected e.g. "
            "postgresql+psycopg://user@host/db or sqlite:///shop.db)"
        ) from None
    return url


def statement_body(query: str) -> str:
    """The query without its trailing semicolons, comments and blanks: the form that is
    stored, wrapped by the `apply` check and run."""
    tokens = [
        token
        for statement in sqlparse.parse(query)
        for token in statement.flatten()  # type: ignore[no-untyped-call]
    ]
    while tokens and (
        tokens[-1].is_whitespace
        or tokens[-1].ttype in sql_tokens.Comment
        or tokens[-1].match(sql_tokens.Punctuation, ";")
    ):
        tokens.pop()
    return "".join(token.value for token in tokens).strip()


def check_single_statement(where: str, query: str) -> None:
    statements = [s for s in sqlparse.split(query) if statement_body(s)]
    if len(statements) != 1:
        raise ConfigError(
            f"{where}.query holds {len(statements)} statements; an audience query must be "
            "exactly one SELECT"
        )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate an audiences file; raise ConfigError naming the first problem."""
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{at}: malformed YAML: {' '.join(problem.split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping with sources, destinations and audiences"
        )
    _alerts_on_key(data)
    try:
        model = ConfigModel.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        line = _line_of(root, error["loc"])
        at = f" (line {line})" if line else ""
        raise ConfigError(f"{path}{at}: {describe_error(exc)[1]}") from None
    config = _build(model, env, root, path)
    alerts = _build_alerts(model, config, env, root, path)
    return dataclasses.replace(config, alerts=alerts)


def _build(
    model: ConfigModel, env: Mapping[str, str], root: yaml.Node | None, path: Path
) -> Config:
    sources = []
    for name, source in model.sources.items():
        resolved = resolve_source_url(name, source.url, env)
        if make_url(resolved).password and not has_env_ref(source.url):
            raise ConfigError(
                f"sources.{name}.url holds a password: move the URL into an environment "
                "variable and write url: '${SHOP_DATABASE_URL}'"
            )
        sources.append(SourceSpec(name, source.url, source.statement_timeout))
    destinations = []
    for name, template in model.destinations.items():
        check_destination(name, template, env, root, path)
        destinations.append(DestinationSpec(name, str(template["type"]), dict(template)))
    audiences: list[AudienceSpec] = []
    seen_keys: dict[str, str] = {}
    for index, audience in enumerate(model.audiences):
        where = f"audiences[{index}] ({audience.name!r})"
        derived = audience_key(audience.name)  # refuses a name with no letters or digits
        key = validate_pinned_key(audience.key) if audience.key else derived
        if key in seen_keys:
            raise ConfigError(
                f"audiences {seen_keys[key]!r} and {audience.name!r} both have the key {key!r}; "
                "rename one or pin a different key with `key:`"
            )
        seen_keys[key] = audience.name
        if audience.source not in model.sources:
            raise ConfigError(
                f"{where}: unknown source {audience.source!r}; "
                f"defined sources: {', '.join(model.sources) or 'none'}"
            )
        for destination in audience.destinations:
            if destination not in model.destinations:
                raise ConfigError(
                    f"{where}: unknown destination {destination!r}; defined destinations: "
                    f"{', '.join(model.destinations) or 'none'}"
                )
        if len(set(audience.destinations)) != len(audience.destinations):
            raise ConfigError(f"{where}: a destination is listed twice")
        check_single_statement(where, audience.query)
        try:
            parse_schedule(audience.schedule)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        audiences.append(
            AudienceSpec(
                key=key,
                name=audience.name,
                is_key_pinned=audience.key is not None,
                source=audience.source,
                query=statement_body(audience.query),
                schedule=audience.schedule,
                destinations=tuple(audience.destinations),
                max_exit_fraction=audience.max_exit_fraction,
            )
        )
    return Config(tuple(sources), tuple(destinations), tuple(audiences))


def _alerts_on_key(data: dict[Any, Any]) -> None:
    """YAML 1.1 reads a bare `on:` key as the boolean true: give it its name back."""
    alerts = data.get("alerts")
    if isinstance(alerts, list):
        for alert in alerts:
            if isinstance(alert, dict) and True in alert:
                alert["on"] = alert.pop(True)


ALERT_URL_SCHEMES = ("http", "https")


def _build_alerts(
    model: ConfigModel, config: Config, env: Mapping[str, str], root: yaml.Node | None, path: Path
) -> tuple[AlertSpec, ...]:
    """The `alerts:` section, checked: an http(s) URL once `${VAR}` is resolved, known
    audience keys, no name twice."""
    keys = {a.key for a in config.audiences}
    alerts: list[AlertSpec] = []
    for index, alert in enumerate(model.alerts):

        def fail(field: str, reason: str, index: int = index, name: str = alert.name) -> NoReturn:
            line = _line_of(root, ("alerts", index, field))
            at = f" (line {line})" if line else ""
            raise ConfigError(f"{path}{at}: alerts[{index}] ({name!r}).{field}: {reason}")

        if any(a.name == alert.name for a in alerts):
            fail("name", "another alert has this name")
        try:
            url = str(resolve_env(alert.url, env, f"alerts[{index}].url"))
        except ConfigError as exc:
            fail("url", str(exc))
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in ALERT_URL_SCHEMES or not rest.strip("/"):
            fail("url", "must be an http:// or https:// URL (a secret one as '${VAR}')")
        for key in alert.audiences or ():
            if key not in keys:
                fail("audiences", f"unknown audience key {key!r}; keys: {', '.join(sorted(keys))}")
        alerts.append(
            AlertSpec(
                name=alert.name,
                url=alert.url,
                events=tuple(dict.fromkeys(alert.on)),
                audience_keys=tuple(alert.audiences) if alert.audiences is not None else None,
            )
        )
    return tuple(alerts)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the YAML node at a pydantic error location (best effort)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
