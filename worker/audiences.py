"""An audience's definition and what it selects: the compile step of rule audiences (used
by `apply`'s check and by each run's snapshot), and `audiences show` / `audiences preview`.

A rule audience is compiled where it is run, from plain values read from the state database
(or the configuration being applied): its rules, its source's layout, reflected from the
source then, and the other audiences of the source that `in_audience` may name. The result
is a SELECT that takes the path of a SQL audience's query from there on.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Select
from sqlalchemy.dialects import registry
from sqlalchemy.orm import Session

from models import Audience
from worker.config import Config, resolve_source_url
from worker.context import ServiceContext
from worker.errors import ConfigError, NotFoundError, SourceError
from worker.repositories import audiences as audience_repo
from worker.rules import (
    Layout,
    LayoutSpec,
    Rule,
    compile_audience,
    parse_rules,
    reflect_layout,
)
from worker.rules.check import check_rules
from worker.sources import SourceRow, check_query, source_engine, stream_source

# What a preview shows at most, whatever --limit asks.
MAX_PREVIEW = 1000


@dataclass(frozen=True, slots=True)
class RuleDefinition:
    """What a rule audience compiles from, as stored: plain data, parsed when compiled."""

    key: str
    rules: Any
    include_anonymous: bool
    layout: Mapping[str, Any] | None  # the source's LayoutSpec settings; None: no layout
    # The other active audiences of the source, for `in_audience`: key -> rules data, or
    # the query text of a SQL audience.
    others: Mapping[str, tuple[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AudienceView:
    """An audience's definition, as `audiences show` prints it."""

    key: str
    name: str
    source: str
    schedule: str
    destinations: tuple[str, ...]
    is_archived: bool
    query: str | None
    rules: Any
    include_anonymous: bool
    layout: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class CompiledAudience:
    """The SQL an audience runs, in its source's dialect, with its bound parameters."""

    key: str
    dialect: str
    sql: str
    params: dict[str, Any]
    now: datetime | None  # the "now" a rule audience was compiled for


@dataclass(frozen=True, slots=True)
class Preview:
    """How many members an audience has now, and the first few (cleaned as a run does)."""

    key: str
    members: int
    sample: tuple[SourceRow, ...]
    skipped: dict[str, int]


def rule_definition(audience: Audience, neighbours: Sequence[Audience]) -> RuleDefinition | None:
    """The rule audience's definition (None for a SQL audience); `neighbours` are audiences
    of any source: those of the audience's own source, active, are kept for `in_audience`."""
    if audience.rules is None:
        return None
    others: dict[str, tuple[str, Any]] = {}
    for other in neighbours:
        if other.source_id != audience.source_id or other.is_archived or other.id == audience.id:
            continue
        others[other.key] = (
            ("rules", other.rules)
            if other.rules is not None
            else (
                "query",
                other.query,
            )
        )
    layout = audience.source.layout
    return RuleDefinition(audience.key, audience.rules, audience.include_anonymous, layout, others)


def compile_rules(definition: RuleDefinition, url: str, *, now: datetime) -> Select[Any]:
    """Reflect the source's layout and compile the rules for `now` (the run's start).
    ConfigError for a rule the source's tables cannot answer; SourceError if the source
    cannot be read."""
    if definition.layout is None:
        raise ConfigError(
            f"audience {definition.key!r} has rules but its source has no `layout:`; add "
            "`layout: segment` to the source and `apply` again"
        )
    layout = reflect_layout(source_engine(url), LayoutSpec(**definition.layout))
    return compile_layout(definition, layout, now=now)


def compile_layout(definition: RuleDefinition, layout: Layout, *, now: datetime) -> Select[Any]:
    """The rules compiled over an already reflected layout."""

    def resolve(name: str) -> Rule | str:
        kind, value = definition.others.get(name, ("", None))
        if kind == "rules":
            return parse_rules(value, at=f"audience {name!r}: rules")
        if kind == "query":
            return str(value)
        raise NotFoundError(f"no active audience with key {name!r} on this source")

    return compile_audience(
        parse_rules(definition.rules),
        layout,
        now=now,
        audience=definition.key,
        include_anonymous=definition.include_anonymous,
        resolve=resolve,
    )


def check_rule_audiences(config: Config, env: Mapping[str, str], *, now: datetime) -> set[str]:
    """`apply`'s check of the rule audiences: each source with rule audiences is reflected
    once; each rule is checked against its tables (its line named), compiled and run with no
    rows wanted. Returns the keys checked. ConfigError, one line, for the first problem."""
    sources = {s.name: s for s in config.sources}
    definitions = _definitions(config)
    layouts: dict[str, Layout] = {}
    checked: set[str] = set()
    for index, audience in enumerate(config.audiences):
        definition = definitions.get(audience.key)
        if definition is None:
            continue
        source = sources[audience.source]
        url = resolve_source_url(source.name, source.url, env)
        if source.name not in layouts:
            if source.layout is None:  # load_config refuses it; a Config built by hand may not
                raise config.rule_error(
                    index, ConfigError(f"rules: source {source.name!r} has no `layout:`")
                )
            try:
                layouts[source.name] = reflect_layout(source_engine(url), source.layout)
            except (ConfigError, SourceError) as exc:
                raise config.source_error(source.name, exc) from None
        layout = layouts[source.name]
        rule = audience.rule
        assert rule is not None  # a definition exists only for rule audiences
        try:
            check_rules(rule, layout, include_anonymous=audience.include_anonymous)
            query = compile_layout(definition, layout, now=now)
        except ConfigError as exc:
            raise config.rule_error(index, exc) from None
        try:
            check_query(
                url,
                query,
                timeout_seconds=source.statement_timeout_seconds,
                source_name=source.name,
            )
        except SourceError as exc:
            raise ConfigError(f"audience {audience.key!r}: {exc}") from None
        checked.add(audience.key)
    return checked


def _definitions(config: Config) -> dict[str, RuleDefinition]:
    sources = {s.name: s for s in config.sources}
    result = {}
    for audience in config.audiences:
        if audience.rules is None:
            continue
        others = {
            other.key: ("rules", other.rules) if other.rules is not None else ("query", other.query)
            for other in config.audiences
            if other.source == audience.source and other.key != audience.key
        }
        result[audience.key] = RuleDefinition(
            audience.key,
            audience.rules,
            audience.include_anonymous,
            sources[audience.source].layout_settings,
            others,
        )
    return result


@dataclass(frozen=True, slots=True)
class _Target:
    query: str | Select[Any]
    url: str
    source_name: str
    timeout: float
    now: datetime


class AudienceInspector:
    """`audiences show` and `audiences preview`: read an audience's definition (one read of
    the state database, never a write) and ask its source."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def show(self, key: str) -> AudienceView:
        with self._ctx.unit_of_work() as session:
            audience = self._audience(session, key)
            return AudienceView(
                key=audience.key,
                name=audience.name,
                source=audience.source.name,
                schedule=audience.schedule,
                destinations=tuple(
                    link.destination.name for link in audience.links if link.is_enabled
                ),
                is_archived=audience.is_archived,
                query=audience.query,
                rules=audience.rules,
                include_anonymous=audience.include_anonymous,
                layout=audience.source.layout,
            )

    def compiled(self, key: str) -> CompiledAudience:
        """The SQL the audience runs: a rule audience compiled for now, with its parameters."""
        target = self._target(key)
        name = source_engine(target.url).dialect.name
        if isinstance(target.query, str):
            return CompiledAudience(key, name, target.query, {}, None)
        # Named parameters (`:name`) on every dialect, so the SQL and its values read together;
        # each value of an `in` list a parameter of its own, as the database receives them.
        dialect = registry.load(name)(paramstyle="named")
        compiled = target.query.compile(
            dialect=dialect, compile_kwargs={"render_postcompile": True}
        )
        return CompiledAudience(key, name, str(compiled), dict(compiled.params), target.now)

    def preview(self, key: str, *, limit: int) -> Preview:
        """The member count and the first `limit` members, as a run would snapshot them
        (cleaned, one per id); the state database is only read, for the definition."""
        target = self._target(key)
        seen: set[str] = set()
        sample: list[SourceRow] = []
        skipped: dict[str, int] = {}
        chunks = stream_source(
            target.url,
            target.query,
            timeout_seconds=target.timeout,
            fetch_size=self._ctx.settings.source_fetch_size,
            source_name=target.source_name,
        )
        for chunk in chunks:
            for row in chunk:
                if isinstance(row, str):
                    skipped[row] = skipped.get(row, 0) + 1
                elif row.member_id in seen:
                    skipped["duplicate_id"] = skipped.get("duplicate_id", 0) + 1
                else:
                    seen.add(row.member_id)
                    if len(sample) < min(limit, MAX_PREVIEW):
                        sample.append(row)
        return Preview(key, len(seen), tuple(sample), skipped)

    def _target(self, key: str) -> "_Target":
        now = self._ctx.clock()
        with self._ctx.unit_of_work() as session:
            audience = self._audience(session, key)
            source = audience.source
            url_template, source_name = source.url, source.name
            timeout = source.statement_timeout_seconds
            definition = rule_definition(audience, audience_repo.all_audiences(session))
            query: str | Select[Any] = audience.query or ""
        url = resolve_source_url(source_name, url_template, self._ctx.env)
        if definition is not None:
            query = compile_rules(definition, url, now=now)
        return _Target(query, url, source_name, timeout, now)

    @staticmethod
    def _audience(session: Session, key: str) -> Audience:
        audience = audience_repo.audience_by_key(session, key)
        if audience is None:
            raise NotFoundError(
                f"no audience with key {key!r}; `audience-sync audiences list` shows them"
            )
        return audience
