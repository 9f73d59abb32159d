"""Rules compiled to one SQLAlchemy Core SELECT over a source's reflected Segment-layout tables.

The result has the columns a SQL audience returns: `user_id` and `email` (plus `anonymous_id`
with `include_anonymous`). Every value is a bound parameter, "now" (the run's start time)
included; every identifier comes from reflection.

Identity: an event counts for its `user_id`; an event with only an `anonymous_id` counts for
the user of the latest `identifies` row (by `timestamp`, rows without one the oldest, then the
greatest `user_id`) that carried that anonymous id and a user id. The universe negations work
in is the `users` table, plus, with `include_anonymous`, the anonymous ids of `tracks` rows
that no `identifies` row ties to a user. Members are compiled twice over that universe: once
keyed by user id, once keyed by anonymous id, so the two kinds of ids never mix.

A comparison with a NULL property or trait is false (`ne` and `not_in` included); `not`
negates a whole rule, per member. Text comparisons follow the database's collation.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeAlias

from sqlalchemy import (
    BindParameter,
    Column,
    ColumnElement,
    Select,
    Subquery,
    Table,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.dialects import registry
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import column as sql_column

from worker.errors import ConfigError, NotFoundError
from worker.rules.grammar import (
    All,
    AnyOf,
    Condition,
    CountKind,
    InAudience,
    Not,
    Operator,
    Performed,
    Rule,
    Trait,
    Window,
)
from worker.rules.layout import Layout, check_condition

# An audience's name -> its rule tree, or its SQL query text; NotFoundError when unknown.
AudienceResolver: TypeAlias = Callable[[str], "Rule | str"]
MEMBER_KEY = "member_key"


@dataclass(frozen=True, slots=True)
class _Context:
    layout: Layout
    now: datetime
    resolve: AudienceResolver
    path: tuple[str, ...]  # audiences being compiled, outermost first: a repeat is a cycle
    is_anonymous: bool  # keyed by anonymous id (the anonymous part of the universe)
    row_key: ColumnElement[Any] | None = None  # the key when it is a `users` row's own id
    # The predicate is one of the ANDed terms of a WHERE (not below `any` or `not`), where
    # PostgreSQL turns NOT EXISTS into an anti-join.
    is_conjunct: bool = True


def compile_audience(
    rule: Rule,
    layout: Layout,
    *,
    now: datetime,
    audience: str,
    include_anonymous: bool = False,
    resolve: AudienceResolver | None = None,
) -> Select[Any]:
    """The members of `rule` as one SELECT of `user_id`, `email` (and `anonymous_id`).

    `now` is the run's start time (timezone-aware); `audience` is this audience's name (for
    cycle detection); `resolve` gives the audiences `in_audience` names. ConfigError for a
    rule that names an unknown event, column or audience, compares mismatched values, or
    makes a cycle of `in_audience`.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    users = layout.users
    email = users.c["email"] if "email" in users.c else null()
    known = users.c["id"]
    context = _Context(layout, now, resolve or _no_audiences, (audience,), False, known)
    identified = select(
        known.label("user_id"),
        email.label("email"),
        *([null().label("anonymous_id")] if include_anonymous else []),
    ).where(known.is_not(null()), _predicate(rule, known, context))
    if not include_anonymous:
        return identified
    anonymous = _unstitched_anonymous_ids(layout, layout.tracks).subquery("anonymous_ids")
    anonymous_context = replace(context, is_anonymous=True, row_key=None)
    unknown = select(
        null().label("user_id"),
        null().label("email"),
        anonymous.c[MEMBER_KEY].label("anonymous_id"),
    ).where(_predicate(rule, anonymous.c[MEMBER_KEY], anonymous_context))
    members = union_all(identified, unknown).subquery("members")
    return select(members.c.user_id, members.c.email, members.c.anonymous_id)


def render_sql(query: Select[Any], dialect: Dialect | str) -> tuple[str, dict[str, Any]]:
    """The query's SQL text in `dialect` (a Dialect or its name) and its bound parameters."""
    resolved = registry.load(dialect)() if isinstance(dialect, str) else dialect
    compiled = query.compile(dialect=resolved)
    return str(compiled), dict(compiled.params)


def _members(rule: Rule, context: _Context) -> Select[Any]:
    """The member keys (user ids, or anonymous ids) `rule` holds for, as a one-column SELECT."""
    universe = _universe(context)
    return select(universe.c[MEMBER_KEY]).where(_predicate(rule, universe.c[MEMBER_KEY], context))


def _universe(context: _Context) -> Subquery:
    layout = context.layout
    if context.is_anonymous:
        return _unstitched_anonymous_ids(layout, layout.tracks).subquery()
    known = layout.users.c["id"]
    return select(known.label(MEMBER_KEY)).where(known.is_not(null())).subquery()


def _predicate(rule: Rule, key: ColumnElement[Any], context: _Context) -> ColumnElement[bool]:
    if isinstance(rule, All):
        return and_(*(_predicate(r, key, context) for r in rule.rules))
    if isinstance(rule, AnyOf):
        inside = replace(context, is_conjunct=False)
        return or_(*(_predicate(r, key, inside) for r in rule.rules))
    if isinstance(rule, Not):
        # Below a `not`, a trait's NULL comparison must stay a definite false (see _trait).
        inside = replace(context, row_key=None)
        if isinstance(rule.rule, All | AnyOf | Not):
            return not_(_predicate(rule.rule, key, replace(inside, is_conjunct=False)))
        return _leaf(rule.rule, key, inside, negate=True)
    return _leaf(rule, key, context, negate=False)


def _leaf(
    rule: Performed | Trait | InAudience,
    key: ColumnElement[Any],
    context: _Context,
    *,
    negate: bool,
) -> ColumnElement[bool]:
    """The condition `rule` (with `negate`: its negation) puts on `key`."""
    if isinstance(rule, Performed):
        return _performed(rule, key, context, negate)
    if isinstance(rule, Trait):
        return _trait(rule, key, context, negate)
    return _in_audience(rule, key, context, negate)


def _performed(
    rule: Performed, key: ColumnElement[Any], context: _Context, negate: bool
) -> ColumnElement[bool]:
    layout = context.layout
    events = layout.event_table(rule.event)
    what = f"performed {rule.event!r}"
    person, filters = _event_person(context, events)
    filters += [_condition(layout, events, c, what) for c in rule.where]
    if rule.window is not None:
        filters += _window(events.c["timestamp"], rule.window, context.now)
    counted = select(person.label(MEMBER_KEY)).where(*filters).subquery()
    member = counted.c[MEMBER_KEY]
    # The NULL test in HAVING, not WHERE: PostgreSQL would compute the stitching lookup twice
    # per anonymous event (once to filter, once to group); in HAVING it reads the group's key.
    people = select(member).group_by(member).having(member.is_not(null()))
    kind, times = rule.count.kind, rule.count.times
    if kind is CountKind.AT_LEAST:
        if times == 0:
            return _constant(not negate)
        return _among(key, people.having(func.count() >= times), context, is_in=not negate)
    if kind is CountKind.AT_MOST:
        return _among(key, people.having(func.count() > times), context, is_in=negate)
    if times == 0:
        return _among(key, people, context, is_in=negate)
    return _among(key, people.having(func.count() == times), context, is_in=not negate)


def _among(
    key: ColumnElement[Any], keys: Select[Any], context: _Context, *, is_in: bool
) -> ColumnElement[bool]:
    """Whether `key` is (`is_in`) or is not one of `keys`, a one-column SELECT without NULLs.

    `key IN (keys)`, or its negation as NOT EXISTS where that is a term of a WHERE's AND:
    PostgreSQL makes it an anti-join, where NOT IN probes the whole list once per person as
    soon as the list is too large to hash in memory (hours on a million users). Elsewhere
    (below `any`), NOT IN: an EXISTS there is a subplan per person too, and costs more to
    plan. Without NULLs on either side the two mean the same. `keys` itself is never
    correlated: it reads tables the outer query reads too.
    """
    keys = keys.correlate(None)
    if is_in:
        return key.in_(keys)
    if not context.is_conjunct:
        return not_(key.in_(keys))
    return not_(_exists_equal(key, keys))


def _exists_equal(key: ColumnElement[Any], keys: Select[Any]) -> ColumnElement[bool]:
    found = keys.subquery()
    (member,) = found.c
    return exists().select_from(found).where(member == key).correlate_except(found)


def _constant(value: bool) -> ColumnElement[bool]:
    return true() if value else not_(true())


def _event_person(
    context: _Context, events: Table
) -> tuple[ColumnElement[Any], list[ColumnElement[bool]]]:
    """Who an event row counts for (NULL: no one), and the rows that may count."""
    if context.is_anonymous:
        anonymous_id = events.c["anonymous_id"]
        return anonymous_id, [
            events.c["user_id"].is_(null()),
            _unstitched(context.layout, anonymous_id),
        ]
    return func.coalesce(events.c["user_id"], _stitched_user(context.layout, events)), []


def _stitched_user(layout: Layout, events: Table) -> ColumnElement[Any]:
    """The user of the latest identifies row carrying the event row's anonymous id.

    A lookup per anonymous event (correlated, one index probe on identifies' anonymous_id),
    not a stitching of all of identifies: the events a rule counts are usually few next to
    the anonymous ids ever seen, and rows with a user id never get here (COALESCE).
    """
    identifies = layout.identifies
    order: list[ColumnElement[Any]] = [identifies.c["user_id"].desc()]
    if "timestamp" in identifies.c:
        moment = identifies.c["timestamp"]
        # Not NULLS LAST, which MySQL lacks: where NULLs sort differs between databases.
        order[:0] = [case((moment.is_(null()), 1), else_=0), moment.desc()]
    return (
        select(identifies.c["user_id"])
        .where(
            identifies.c["anonymous_id"] == events.c["anonymous_id"],
            identifies.c["user_id"].is_not(null()),
        )
        .order_by(*order)
        .limit(1)
        .correlate(events)
        .scalar_subquery()
    )


def _unstitched_anonymous_ids(layout: Layout, events: Table) -> Select[Any]:
    """Distinct anonymous ids of `events` rows with no user id that no identifies row ties."""
    anonymous_id = events.c["anonymous_id"]
    return (
        select(anonymous_id.label(MEMBER_KEY))
        .where(events.c["user_id"].is_(null()), _unstitched(layout, anonymous_id))
        .distinct()
    )


def _unstitched(layout: Layout, anonymous_id: ColumnElement[Any]) -> ColumnElement[bool]:
    """An anonymous id that no identifies row ties to a user."""
    identifies = layout.identifies
    stitched = select(identifies.c["anonymous_id"]).where(
        identifies.c["anonymous_id"].is_not(null()), identifies.c["user_id"].is_not(null())
    )
    # NOT EXISTS: a term of the event rows' WHERE, so an anti-join (see _among).
    return and_(anonymous_id.is_not(null()), not_(_exists_equal(anonymous_id, stitched)))


def _window(timestamp: Column[Any], window: Window, now: datetime) -> list[ColumnElement[bool]]:
    aware = bool(getattr(timestamp.type, "timezone", False))

    def moment(value: datetime) -> datetime:
        utc = value.astimezone(UTC)
        return utc if aware else utc.replace(tzinfo=None)

    def bound(name: str, value: datetime) -> BindParameter[Any]:
        return bindparam(name, moment(value), type_=timestamp.type, unique=True)

    newest = "now" if not window.newest else "window_end"
    return [
        timestamp >= bound("window_start", now - window.oldest),
        timestamp <= bound(newest, now - window.newest),
    ]


def _trait(
    rule: Trait, key: ColumnElement[Any], context: _Context, negate: bool
) -> ColumnElement[bool]:
    if context.is_anonymous:  # anonymous ids have no traits
        return _constant(negate)
    users = context.layout.users
    if not negate and context.row_key is not None and key is context.row_key:
        # The key is the id of the users row being read: test that row, no lookup needed.
        # Never below a `not` (row_key is unset there): a comparison with NULL is NULL, and
        # NOT NULL would drop the member that `not` should keep.
        return and_(*(_condition(context.layout, users, c, "trait") for c in rule.conditions))
    holders = select(users.c["id"]).where(
        users.c["id"].is_not(null()),
        *(_condition(context.layout, users, c, "trait") for c in rule.conditions),
    )
    return _among(key, holders, context, is_in=not negate)


def _condition(
    layout: Layout, table: Table, condition: Condition, what: str
) -> ColumnElement[bool]:
    column = layout.column(table, condition.key, what=what)
    check_condition(column, condition, what=what)
    operator, value = condition.operator, condition.value
    if operator is Operator.EXISTS:
        return column.is_not(null())
    if operator is Operator.NOT_EXISTS:
        return column.is_(null())
    # Each value bound with its own type, not the column's: bound as an INTEGER, 49.5 would
    # arrive as 50 (PostgreSQL rounds the cast) and `age > 49.5` would leave out age 50.
    values = [literal(v) for v in (value if isinstance(value, tuple) else (value,))]
    if operator is Operator.IN:
        return column.in_(values)
    if operator is Operator.NOT_IN:
        return and_(column.is_not(null()), column.not_in(values))
    if operator is Operator.CONTAINS:
        # Not LIKE: SQLite's LIKE ignores case, and `%` or `_` in the value would be wildcards.
        position = func.strpos if layout.dialect == "postgresql" else func.instr
        return position(column, literal(value)) > 0
    if operator is Operator.STARTS_WITH:
        text_value = str(value)
        return func.substr(column, 1, len(text_value)) == literal(text_value)
    comparisons = {
        Operator.EQ: column.__eq__,
        Operator.NE: column.__ne__,
        Operator.GT: column.__gt__,
        Operator.GTE: column.__ge__,
        Operator.LT: column.__lt__,
        Operator.LTE: column.__le__,
    }
    result: ColumnElement[bool] = comparisons[operator](values[0])
    return result


def _in_audience(
    rule: InAudience, key: ColumnElement[Any], context: _Context, negate: bool
) -> ColumnElement[bool]:
    if rule.audience in context.path:
        cycle = " -> ".join((*context.path[context.path.index(rule.audience) :], rule.audience))
        raise ConfigError(f"in_audience makes a cycle: {cycle}")
    try:
        other = context.resolve(rule.audience)
    except NotFoundError as exc:
        raise ConfigError(f"in_audience {rule.audience!r}: {exc}") from None
    if isinstance(other, str):
        if context.is_anonymous:  # a SQL audience is matched by user id only
            return _constant(negate)
        # On lines of its own: a `--` comment ending the query must not hide the `)`.
        sql = "\n" + other.strip().rstrip(";") + "\n"
        query = text(sql).columns(sql_column("user_id")).subquery(f"audience_{len(context.path)}")
        # Cast: a SQL audience may return numeric ids where the users table keeps text.
        user_id = cast(query.c.user_id, context.layout.users.c["id"].type)
        members = select(user_id).where(query.c.user_id.is_not(null()))
        return _among(key, members, context, is_in=not negate)
    # The other audience's own WHERE: its terms are conjuncts again.
    inner = replace(context, path=(*context.path, rule.audience), row_key=None, is_conjunct=True)
    return _among(key, _members(other, inner), context, is_in=not negate)


def _no_audiences(name: str) -> Rule | str:
    raise NotFoundError(f"no audience named {name!r}")
