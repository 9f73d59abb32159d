"""Loading `audiences.yml`: YAML with line numbers, `${VAR}` interpolation, validation.

Destination settings are checked by the destination registry (the same path a run takes);
this module adds the file's line numbers to what it reports.

The result is a plain `Config` value; nothing here touches the state database.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlparse
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlparse import tokens as sql_tokens

from worker.destinations.registry import (
    DestinationSettingsError,
    resolve_settings,
    settings_class,
)
from worker.destinations.settings import describe_error
from worker.domain import AlertEvent
from worker.envrefs import has_env_ref, resolve_env
from worker.errors import ConfigError
from worker.keys import audience_key, validate_pinned_key
from worker.payloads import DEFAULT_SPACE_ID, SendAs
from worker.rules import LayoutSpec, Rule, parse_layout_spec, parse_rules, referenced_audiences
from worker.rules.check import walk_rules
from worker.rules.grammar import InAudience
from worker.rules.layout import LAYOUTS
from worker.scheduling import DEFAULT_SCHEDULE, parse_schedule


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class SourceModel(_Strict):
    url: str = Field(min_length=1)
    statement_timeout: float = Field(default=300.0, gt=0, description="seconds")
    # The event layout rule audiences compile against (worker.rules.layout); none: SQL only.
    layout: str | None = None
    schema_: str | None = Field(default=None, alias="schema")
    tracks: str | None = None
    identifies: str | None = None
    users: str | None = None


class AudienceModel(_Strict):
    name: str = Field(min_length=1, max_length=200)
    key: str | None = None
    source: str
    query: str | None = Field(default=None, min_length=1)
    # Rule audiences: checked by worker.rules' grammar, which names the valid choices.
    rules: Any = None
    include_anonymous: bool = False
    schedule: str = DEFAULT_SCHEDULE
    # A destination's name, or `{name: NAME, send_as: ..., ortto_audience_name: ...}`.
    destinations: list[str | dict[str, Any]] = Field(min_length=1)
    max_exit_fraction: float = Field(default=0.5, gt=0, le=1)


class PairModel(_Strict):
    """One destination of an audience written as a mapping (checked by `_pair_spec`)."""

    name: str = Field(min_length=1, max_length=100)
    send_as: str = SendAs.IDENTIFY.value
    ortto_audience_name: str | None = None


class WorkspaceModel(_Strict):
    space_id: str = Field(default=DEFAULT_SPACE_ID, max_length=100)

    @field_validator("space_id")
    @classmethod
    def _space_id_is_not_blank(cls, value: str) -> str:
        if not value:
            raise ValueError(
                f"workspace.space_id is blank: write the workspace's space id (like "
                f"spa_o1E9...), or leave the key out for {DEFAULT_SPACE_ID!r}"
            )
        return value


# Source and destination names: the state database keeps at most 100 characters.
Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]


class AlertModel(_Strict):
    name: Name
    url: str = Field(min_length=1)
    on: list[AlertEvent] = Field(default_factory=lambda: list(AlertEvent), min_length=1)
    audiences: list[str] | None = None


class ConfigModel(_Strict):
    workspace: WorkspaceModel | None = None
    sources: dict[Name, SourceModel] = Field(default_factory=dict)
    destinations: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    audiences: list[AudienceModel] = Field(default_factory=list)
    alerts: list[AlertModel] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SourceSpec:
    name: str
    url: str  # template: `${VAR}` references kept, resolved at run time
    statement_timeout_seconds: float
    layout: LayoutSpec | None = None  # set: rule audiences may use this source

    @property
    def layout_settings(self) -> dict[str, Any] | None:
        """The layout as stored (`sources.layout`); `LayoutSpec(**settings)` reads it back."""
        return None if self.layout is None else asdict(self.layout)


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    name: str
    type: str
    settings: dict[str, Any]  # template


@dataclass(frozen=True, slots=True)
class PairSpec:
    """How an audience goes to one of its destinations."""

    name: str
    send_as: SendAs = SendAs.IDENTIFY
    ortto_audience_name: str | None = None


@dataclass(frozen=True, slots=True)
class AudienceSpec:
    key: str
    name: str
    is_key_pinned: bool
    source: str
    query: str | None  # None: a rule audience
    schedule: str
    destinations: tuple[str, ...]
    max_exit_fraction: float
    # One per destination, in the order of `destinations`.
    outputs: tuple[PairSpec, ...] = ()
    rules: Any = None  # a rule audience's `rules:` as written (plain data, stored as JSON)
    include_anonymous: bool = False

    @property
    def rule(self) -> Rule | None:
        """The parsed rule tree (the data was checked when the file was loaded)."""
        return None if self.rules is None else parse_rules(self.rules)


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
    # The workspace's space id (Engage's `context.personas.space_id` and `namespace`).
    space_id: str = DEFAULT_SPACE_ID
    # Where the file came from, to name the line of a problem found after loading (`apply`).
    path: Path | None = None
    root: yaml.Node | None = field(default=None, compare=False, repr=False)
    alerts: tuple[AlertSpec, ...] = ()

    def locate(self, *loc: int | str) -> str:
        """`FILE (line N)` of the YAML node at `loc` (as far as it goes), for messages."""
        return _where(self.path, self.root, loc)

    def rule_error(self, index: int, exc: ConfigError) -> ConfigError:
        """A rule problem of audience `index` (its message starting `rules...: `) as one line
        naming the file and the rule's line."""
        return rule_error(self, index, exc)

    def source_error(self, name: str, exc: Exception) -> ConfigError:
        """A problem with source `name`'s layout found after loading (its tables), as one
        line naming the file and the source's `layout:` line."""
        return ConfigError(f"{self.locate('sources', name, 'layout')}: sources.{name}: {exc}")


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


def _pair_spec(
    entry: str | dict[str, Any],
    loc: tuple[int | str, ...],
    kinds: Mapping[str, Any],
    root: yaml.Node | None,
    path: Path,
) -> PairSpec:
    """One destination entry of an audience, checked against its destination's type; a
    problem names the file and the line."""

    def refuse(key: str | None, message: str) -> ConfigError:
        at = (*loc, key) if key else loc
        number = _line_of(root, at) if root is not None else None
        line = f" (line {number})" if number else ""
        where = ".".join(str(part) for part in at)
        return ConfigError(f"{path}{line}: {where}: {message}")

    if isinstance(entry, str):
        return PairSpec(entry)
    try:
        pair = PairModel.model_validate(entry)
    except ValidationError as exc:
        error_loc, reason = describe_error(exc)
        key = str(error_loc[0]) if error_loc else None
        raise refuse(key, reason.removeprefix(f"{key}: ")) from None
    try:
        send_as = SendAs(pair.send_as)
    except ValueError:
        choices = ", ".join(value.value for value in SendAs)
        raise refuse("send_as", f"must be one of {choices} (got {pair.send_as!r})") from None
    kind = kinds.get(pair.name)
    settings = settings_class(kind)
    if settings is not None and send_as != SendAs.IDENTIFY and not settings.accepts_track:
        raise refuse(
            "send_as",
            f"destination {pair.name!r} is of type {kind}, which takes no track events; "
            "use send_as: identify",
        )
    if pair.ortto_audience_name is not None:
        if settings is not None and not settings.keeps_native_audiences:
            raise refuse(
                "ortto_audience_name",
                f"destination {pair.name!r} is of type {kind}; only an ortto-audiences "
                "destination keeps a native Ortto audience to name",
            )
        if not pair.ortto_audience_name:
            raise refuse("ortto_audience_name", "is blank; write a name or leave the key out")
    return PairSpec(pair.name, send_as, pair.ortto_audience_name)


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
        layout = _layout_of(name, source, root, path)
        sources.append(SourceSpec(name, source.url, source.statement_timeout, layout))
    destinations = []
    for name, template in model.destinations.items():
        check_destination(name, template, env, root, path)
        destinations.append(DestinationSpec(name, str(template["type"]), dict(template)))
    kinds = {name: template.get("type") for name, template in model.destinations.items()}
    audiences: list[AudienceSpec] = []
    seen_keys: dict[str, str] = {}
    for index, audience in enumerate(model.audiences):
        where = f"audiences[{index}] ({audience.name!r})"
        outputs = tuple(
            _pair_spec(entry, ("audiences", index, "destinations", position), kinds, root, path)
            for position, entry in enumerate(audience.destinations)
        )
        names = [output.name for output in outputs]
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
        for destination in names:
            if destination not in model.destinations:
                raise ConfigError(
                    f"{where}: unknown destination {destination!r}; defined destinations: "
                    f"{', '.join(model.destinations) or 'none'}"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: a destination is listed twice")
        _check_definition(index, audience, model, root, path)
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
                query=None if audience.query is None else statement_body(audience.query),
                schedule=audience.schedule,
                destinations=tuple(names),
                max_exit_fraction=audience.max_exit_fraction,
                outputs=outputs,
                rules=audience.rules,
                include_anonymous=audience.include_anonymous,
            )
        )
    space_id = model.workspace.space_id if model.workspace else DEFAULT_SPACE_ID
    config = Config(
        tuple(sources), tuple(destinations), tuple(audiences), space_id, path=path, root=root
    )
    _check_in_audience(config)
    return config


def _where(path: Path | None, root: yaml.Node | None, loc: tuple[int | str, ...]) -> str:
    line = _line_of(root, loc) if root is not None else None
    at = f" (line {line})" if line else ""
    return f"{path}{at}" if path is not None else f"line {line}" if line else "configuration"


def _layout_of(
    name: str, source: SourceModel, root: yaml.Node | None, path: Path
) -> LayoutSpec | None:
    """The source's layout settings, or None for a source of SQL audiences only."""
    given = {
        "layout": source.layout,
        "schema": source.schema_,
        "tracks": source.tracks,
        "identifies": source.identifies,
        "users": source.users,
    }
    settings = {key: value for key, value in given.items() if value is not None}
    if not settings:
        return None
    try:
        return parse_layout_spec(settings, at=f"sources.{name}")
    except ConfigError as exc:
        key = "layout" if "layout" in settings else next(iter(settings))
        message = str(exc)
        if not message.startswith("sources."):
            message = f"sources.{name}.layout: {message}"
        raise ConfigError(f"{_where(path, root, ('sources', name, key))}: {message}") from None


def _check_definition(
    index: int, audience: AudienceModel, model: ConfigModel, root: yaml.Node | None, path: Path
) -> None:
    """Exactly one of `query` and `rules`; rules parse and their source has a layout."""
    where = f"audiences[{index}] ({audience.name!r})"
    has_query, has_rules = audience.query is not None, audience.rules is not None
    if has_query == has_rules:
        loc: tuple[int | str, ...] = ("audiences", index, "rules" if has_rules else "name")
        raise ConfigError(
            f"{_where(path, root, loc)}: {where}: give exactly one of `query:` (SQL) and "
            f"`rules:` (conditions on events and traits); found "
            f"{'both' if has_query else 'neither'}"
        )
    if audience.query is not None:
        if audience.include_anonymous:
            raise ConfigError(
                f"{_where(path, root, ('audiences', index, 'include_anonymous'))}: {where}: "
                "include_anonymous is for `rules:`; a query includes anonymous users by "
                "returning an anonymous_id column"
            )
        check_single_statement(where, audience.query)
        return
    source = model.sources[audience.source]
    if source.layout is None:
        raise ConfigError(
            f"{_where(path, root, ('audiences', index, 'rules'))}: {where}: rules need a source "
            f"with a layout, and source {audience.source!r} has none; add `layout: segment` "
            f"to it (valid layouts: {', '.join(LAYOUTS)})"
        )
    try:
        parse_rules(audience.rules, at="rules")
    except ConfigError as exc:
        raise _rule_error(path, root, index, audience.name, exc) from None


def _check_in_audience(config: Config) -> None:
    """Every `in_audience` names an audience of the same source, and none makes a cycle."""
    by_key = {a.key: (index, a) for index, a in enumerate(config.audiences)}
    for index, audience in enumerate(config.audiences):
        rule = audience.rule
        if rule is None:
            continue
        for at, node in walk_rules(rule):
            if not isinstance(node, InAudience):
                continue
            found = by_key.get(node.audience)
            same_source = sorted(k for k, (_, a) in by_key.items() if a.source == audience.source)
            if found is None or found[1].source != audience.source:
                elsewhere = f" (it is on source {found[1].source!r})" if found else ""
                problem = ConfigError(
                    f"{at}.in_audience: unknown audience {node.audience!r}{elsewhere}; "
                    f"audiences of source {audience.source!r}: {', '.join(same_source)}"
                )
                raise config.rule_error(index, problem)
            cycle = _cycle(config, by_key, (audience.key, node.audience))
            if cycle:
                problem = ConfigError(f"{at}.in_audience: makes a cycle: {' -> '.join(cycle)}")
                raise config.rule_error(index, problem)


def _cycle(
    config: Config, by_key: Mapping[str, tuple[int, AudienceSpec]], path: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The first cycle through `path` (audience keys, each naming the next), if any."""
    if path[-1] == path[0]:
        return path
    if path[-1] in path[:-1]:
        return None  # a cycle that does not pass through path[0]: reported from its own start
    rule = by_key[path[-1]][1].rule
    for name in sorted(referenced_audiences(rule) if rule is not None else ()):
        if name in by_key:
            found = _cycle(config, by_key, (*path, name))
            if found:
                return found
    return None


_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")


def _loc_of(at: str) -> tuple[int | str, ...]:
    """`rules.all[0].where` -> ("rules", "all", 0, "where")."""
    return tuple(int(number) if number else name for name, number in _STEP.findall(at))


def rule_error(config: Config, index: int, exc: ConfigError) -> ConfigError:
    """A rule problem of audience `index` (its message starting `rules...: `) as one line
    naming the file and the rule's line."""
    return _rule_error(config.path, config.root, index, config.audiences[index].name, exc)


def _rule_error(
    path: Path | None, root: yaml.Node | None, index: int, name: str, exc: ConfigError
) -> ConfigError:
    at, separator, reason = str(exc).partition(": ")
    if not separator or not at.startswith("rules"):
        at, reason = "rules", str(exc)
    where = _where(path, root, ("audiences", index, *_loc_of(at)))
    return ConfigError(f"{where}: audiences[{index}] ({name!r}).{at}: {reason}")


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
