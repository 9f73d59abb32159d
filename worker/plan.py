"""The plan of an `apply`: what a configuration would create, change, archive or revive,
computed from the catalog's current values and the desired configuration (no I/O), and the
refusals that protect against an apply that would do much harm by mistake."""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.domain import ApplyReport
from worker.errors import ConfigError
from worker.payloads import DEFAULT_SPACE_ID, SendAs

if TYPE_CHECKING:  # only annotations: worker.config brings the destinations (httpx) along
    from worker.config import Config


class Action(enum.StrEnum):
    """What an apply does to one source, destination or audience."""

    CREATE = "create"
    CHANGE = "change"
    ARCHIVE = "archive"
    REVIVE = "revive"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class SourceState:
    name: str
    url: str
    statement_timeout_seconds: float
    layout: Mapping[str, Any] | None = None  # rule audiences' event layout (None: SQL only)


@dataclass(frozen=True, slots=True)
class DestinationState:
    name: str
    type: str
    settings: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AudienceState:
    """One audience as the catalog holds it (`destinations`: the enabled ones, each as
    `describe_output` writes it, so a change of how it is sent shows in the plan)."""

    key: str
    name: str
    source: str
    query: str | None  # None: a rule audience
    schedule: str
    destinations: tuple[str, ...]
    max_exit_fraction: float
    is_archived: bool
    rules: Any = None  # a rule audience's rules, as written
    include_anonymous: bool = False
    space_id: str = DEFAULT_SPACE_ID


@dataclass(frozen=True, slots=True)
class CatalogState:
    sources: tuple[SourceState, ...] = ()
    destinations: tuple[DestinationState, ...] = ()
    audiences: tuple[AudienceState, ...] = ()


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field's value before and after (None: absent)."""

    field: str
    before: Any
    after: Any


@dataclass(frozen=True, slots=True)
class ItemPlan:
    """What the apply does to one source (`kind` "source"), destination or audience; `name`
    is the audience's key for an audience."""

    kind: str
    name: str
    action: Action
    changes: tuple[FieldChange, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    items: tuple[ItemPlan, ...]
    # Why this apply must not go ahead as it is (empty: it may).
    refusals: tuple[str, ...] = ()

    def keys(self, kind: str, action: Action) -> list[str]:
        return [i.name for i in self.items if i.kind == kind and i.action == action]

    @property
    def is_refused(self) -> bool:
        return bool(self.refusals)

    def report(self) -> ApplyReport:
        """The audiences by what the apply does to them (a revived one counts as updated)."""
        return ApplyReport(
            created=self.keys("audience", Action.CREATE),
            updated=[
                i.name
                for i in self.items
                if i.kind == "audience" and i.action in (Action.CHANGE, Action.REVIVE)
            ],
            archived=self.keys("audience", Action.ARCHIVE),
            unchanged=self.keys("audience", Action.UNCHANGED),
        )


class ApplyRefused(ConfigError):
    """The plan of an apply was refused (see `compute_plan`); nothing was written."""

    def __init__(self, plan: Plan) -> None:
        super().__init__("; ".join(plan.refusals))
        self.plan = plan


# The audience fields a plan names, in the order it shows them: (field, attribute).
AUDIENCE_FIELDS = (
    ("name", "name"),
    ("source", "source"),
    ("query", "query"),
    ("rules", "rules"),
    ("include_anonymous", "include_anonymous"),
    ("schedule", "schedule"),
    ("destinations", "destinations"),
    ("guard", "max_exit_fraction"),
    ("space_id", "space_id"),
)


def compute_plan(
    current: CatalogState,
    desired: Config,
    *,
    allow_archive_all: bool = False,
    allowed_new_keys: Collection[str] = (),
) -> Plan:
    """The plan of applying `desired` over `current`, with its refusals:

    - a configuration that would archive every active audience, unless `allow_archive_all`;
    - an audience new by key while an audience this apply archives has the same source and
      query (most likely a renamed audience that lost its trait), unless its key is in
      `allowed_new_keys`.
    """
    items = [
        *_source_items(current.sources, desired),
        *_destination_items(current.destinations, desired),
        *_audience_items(current.audiences, desired),
    ]
    refusals = _refusals(
        current.audiences,
        desired,
        items,
        allow_archive_all=allow_archive_all,
        allowed_new_keys=allowed_new_keys,
    )
    return Plan(items=tuple(items), refusals=tuple(refusals))


def _diff(pairs: Sequence[tuple[str, Any, Any]]) -> tuple[FieldChange, ...]:
    return tuple(FieldChange(name, old, new) for name, old, new in pairs if old != new)


def _source_items(current: Sequence[SourceState], desired: Config) -> list[ItemPlan]:
    known = {s.name: s for s in current}
    items = []
    for spec in desired.sources:
        old = known.get(spec.name)
        fields = (
            ("url", old.url if old else None, spec.url),
            (
                "statement_timeout",
                old.statement_timeout_seconds if old else None,
                spec.statement_timeout_seconds,
            ),
            ("layout", old.layout if old else None, spec.layout_settings),
        )
        items.append(_item("source", spec.name, is_new=old is None, changes=_diff(fields)))
    return items


def _destination_items(current: Sequence[DestinationState], desired: Config) -> list[ItemPlan]:
    known = {d.name: d for d in current}
    items = []
    for spec in desired.destinations:
        old = known.get(spec.name)
        before = dict(old.settings) if old else {}
        # Field by field: each setting, `type` included (values are templates: `${VAR}`, never
        # a secret).
        fields = [(name, before.get(name), spec.settings.get(name)) for name in spec.settings]
        fields += [(name, old, None) for name, old in before.items() if name not in spec.settings]
        items.append(_item("destination", spec.name, is_new=old is None, changes=_diff(fields)))
    return items


def _item(kind: str, name: str, *, is_new: bool, changes: tuple[FieldChange, ...]) -> ItemPlan:
    if is_new:
        return ItemPlan(kind, name, Action.CREATE, changes)
    return ItemPlan(kind, name, Action.CHANGE if changes else Action.UNCHANGED, changes)


def describe_output(name: str, send_as: str, ortto_audience_name: str | None) -> str:
    """One destination of an audience as a plan shows it: its name, and how it is sent when
    that is not the default (`segment (send_as: track)`)."""
    extras = [f"send_as: {send_as}"] if send_as != SendAs.IDENTIFY else []
    if ortto_audience_name is not None:
        extras.append(f"ortto_audience_name: {ortto_audience_name}")
    return f"{name} ({', '.join(extras)})" if extras else name


def _audience_values(audience: AudienceState) -> dict[str, Any]:
    values = {label: getattr(audience, attribute) for label, attribute in AUDIENCE_FIELDS}
    values["destinations"] = tuple(sorted(audience.destinations))
    return values


def _audience_items(current: Sequence[AudienceState], desired: Config) -> list[ItemPlan]:
    known = {a.key: a for a in current}
    wanted = {a.key for a in desired.audiences}
    items = []
    for spec in desired.audiences:
        new = _audience_values(
            AudienceState(
                key=spec.key,
                name=spec.name,
                source=spec.source,
                query=spec.query,
                schedule=spec.schedule,
                destinations=tuple(
                    describe_output(o.name, o.send_as, o.ortto_audience_name) for o in spec.outputs
                )
                or spec.destinations,
                max_exit_fraction=spec.max_exit_fraction,
                is_archived=False,
                rules=spec.rules,
                include_anonymous=spec.include_anonymous,
                space_id=desired.space_id,
            )
        )
        old_audience = known.get(spec.key)
        old = _audience_values(old_audience) if old_audience else {}
        changes = _diff([(label, old.get(label), new[label]) for label, _ in AUDIENCE_FIELDS])
        if old_audience is None:
            action = Action.CREATE
        elif old_audience.is_archived:
            action = Action.REVIVE
        else:
            action = Action.CHANGE if changes else Action.UNCHANGED
        items.append(ItemPlan("audience", spec.key, action, changes))
    for audience in current:
        if audience.key not in wanted and not audience.is_archived:
            items.append(ItemPlan("audience", audience.key, Action.ARCHIVE))
    return items


def same_query(a: str | None, b: str | None) -> bool:
    """Whether two queries are the same but for spacing and line breaks (a rule audience
    has no query)."""
    return a is not None and b is not None and a.split() == b.split()


def _refusals(
    current: Sequence[AudienceState],
    desired: Config,
    items: Sequence[ItemPlan],
    *,
    allow_archive_all: bool,
    allowed_new_keys: Collection[str],
) -> list[str]:
    refusals = []
    active = [a.key for a in current if not a.is_archived]
    archived = {i.name for i in items if i.kind == "audience" and i.action == Action.ARCHIVE}
    if active and archived == set(active) and not allow_archive_all:
        refusals.append(
            f"this file would archive every active audience ({', '.join(sorted(active))}); "
            "nothing was changed. If that is intended, pass --allow-archive-all"
        )
    created = {i.name for i in items if i.kind == "audience" and i.action == Action.CREATE}
    for key in sorted(set(allowed_new_keys) - created):
        # A mistyped key would let nothing through and hide the rename it was meant for.
        refusals.append(
            f"--allow-new-key {key}: this file creates no audience with that key"
            + (f" (it creates: {', '.join(sorted(created))})" if created else "")
        )
    leaving = [a for a in current if a.key in archived]
    for spec in desired.audiences:
        if spec.key not in created or spec.key in allowed_new_keys:
            continue
        for old in leaving:
            same_rules = old.rules is not None and old.rules == spec.rules
            if old.source == spec.source and (same_query(old.query, spec.query) or same_rules):
                refusals.append(
                    f"audience {spec.name!r} would be created with the new key {spec.key!r} "
                    f"while {old.key!r}, which this file archives, has the same source and "
                    f"{'rules' if same_rules else 'query'}: a likely rename, which would "
                    f"leave {old.key!r} true at the destinations. To keep the key, add the "
                    f"line `key: {old.key}` to the audience {spec.name!r}; to create a new "
                    f"key anyway, pass --allow-new-key {spec.key}"
                )
                break
    return refusals
