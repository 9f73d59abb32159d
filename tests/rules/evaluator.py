"""A plain-Python reference for rule audiences: the same rules over the same rows, slowly.

Written from the documented meaning, not from the compiler: every person of the universe is
taken in turn and every rule is checked by walking the rows. Property and trait names are
used as they are (the test data names its columns in snake_case already).
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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
)

Row = dict[str, Any]


@dataclass
class Dataset:
    """Rows as the warehouse holds them; `events` maps an event name to its table's rows."""

    users: list[Row] = field(default_factory=list)
    identifies: list[Row] = field(default_factory=list)
    events: dict[str, list[Row]] = field(default_factory=dict)

    def tracks(self) -> list[Row]:
        return [row for rows in self.events.values() for row in rows]


@dataclass(frozen=True)
class Person:
    key: str
    is_anonymous: bool


def evaluate(
    rule: Rule,
    data: Dataset,
    *,
    now: datetime,
    include_anonymous: bool,
    audiences: dict[str, Rule | str] | None = None,
) -> set[tuple[str | None, str | None, str | None]]:
    """Members as (user_id, anonymous_id, email); anonymous_id is None without include_anonymous."""
    stitched = _stitch(data)
    members: set[tuple[str | None, str | None, str | None]] = set()
    for user in data.users:
        if user["id"] is not None and _holds(
            rule, Person(user["id"], False), data, stitched, now, audiences or {}
        ):
            members.add((user["id"], None, user.get("email")))
    if include_anonymous:
        anonymous = {
            row["anonymous_id"]
            for row in data.tracks()
            if row["user_id"] is None
            and row["anonymous_id"] is not None
            and row["anonymous_id"] not in stitched
        }
        for key in anonymous:
            if _holds(rule, Person(key, True), data, stitched, now, audiences or {}):
                members.add((None, key, None))
    return members


def _stitch(data: Dataset) -> dict[str, str]:
    """anonymous id -> user id of its latest identifies row (ties: the greatest user id)."""
    best: dict[str, tuple[bool, datetime, str]] = {}
    for row in data.identifies:
        anonymous, user = row["anonymous_id"], row["user_id"]
        if anonymous is None or user is None:
            continue
        moment = row["timestamp"]  # a row without one is older than any with one
        candidate = (moment is not None, moment or datetime.min, user)
        if anonymous not in best or candidate > best[anonymous]:
            best[anonymous] = candidate
    return {anonymous: user for anonymous, (_, _, user) in best.items()}


def _holds(
    rule: Rule,
    person: Person,
    data: Dataset,
    stitched: dict[str, str],
    now: datetime,
    audiences: dict[str, Rule | str],
) -> bool:
    def again(inner: Rule) -> bool:
        return _holds(inner, person, data, stitched, now, audiences)

    if isinstance(rule, All):
        return all(again(r) for r in rule.rules)
    if isinstance(rule, AnyOf):
        return any(again(r) for r in rule.rules)
    if isinstance(rule, Not):
        return not again(rule.rule)
    if isinstance(rule, Trait):
        if person.is_anonymous:
            return False
        rows = [u for u in data.users if u["id"] == person.key]
        return any(all(_matches(u.get(c.key), c) for c in rule.conditions) for u in rows)
    if isinstance(rule, InAudience):
        other = audiences[rule.audience]
        assert not isinstance(other, str), "SQL audiences are tested elsewhere"
        return again(other)
    assert isinstance(rule, Performed)
    return _counts(_times(rule, person, data, stitched, now), rule)


def _times(
    rule: Performed, person: Person, data: Dataset, stitched: dict[str, str], now: datetime
) -> int:
    table = rule.event.lower().replace(" ", "_")
    times = 0
    for row in data.events.get(table, []):
        if person.is_anonymous:
            owner = (
                row["anonymous_id"]
                if row["user_id"] is None and row["anonymous_id"] not in stitched
                else None
            )
        else:
            owner = row["user_id"] or stitched.get(row["anonymous_id"])
        if owner != person.key:
            continue
        if rule.window is not None and not (
            now - rule.window.oldest <= row["timestamp"] <= now - rule.window.newest
        ):
            continue
        if all(_matches(row.get(c.key), c) for c in rule.where):
            times += 1
    return times


def _counts(times: int, rule: Performed) -> bool:
    wanted = rule.count.times
    if rule.count.kind is CountKind.AT_LEAST:
        return times >= wanted
    if rule.count.kind is CountKind.AT_MOST:
        return times <= wanted
    return times == wanted


def _matches(value: Any, condition: Condition) -> bool:
    operator, operand = condition.operator, condition.value
    if operator is Operator.EXISTS:
        return value is not None
    if operator is Operator.NOT_EXISTS:
        return value is None
    if value is None:  # SQL: a comparison with NULL is never true
        return False
    if operator is Operator.IN:
        return value in (operand if isinstance(operand, tuple) else ())
    if operator is Operator.NOT_IN:
        return value not in (operand if isinstance(operand, tuple) else ())
    if operator is Operator.CONTAINS:
        return str(operand) in value
    if operator is Operator.STARTS_WITH:
        return bool(value.startswith(str(operand)))
    return {
        Operator.EQ: value == operand,
        Operator.NE: value != operand,
        Operator.GT: value > operand,
        Operator.GTE: value >= operand,
        Operator.LT: value < operand,
        Operator.LTE: value <= operand,
    }[operator]
