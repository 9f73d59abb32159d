"""The rule grammar of rule audiences: typed, validated values parsed from the YAML's plain data.

A rule is one of `all`, `any`, `not` (combinators), `performed` (an event, with `where`,
`count`, `within` or `between`), `trait` (columns of the `users` table) or `in_audience`
(another audience of the same source). Parsing checks the shape only; whether the events
and columns exist is checked against the source's layout (`worker.rules.layout`).
"""

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TypeAlias, cast

from worker.errors import ConfigError

Scalar: TypeAlias = str | int | float | bool


class Operator(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    STARTS_WITH = "starts_with"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"


class CountKind(StrEnum):
    AT_LEAST = "at_least"
    AT_MOST = "at_most"
    EXACTLY = "exactly"


COMPARISONS = frozenset({Operator.EQ, Operator.NE, Operator.GT, Operator.GTE})
COMPARISONS |= {Operator.LT, Operator.LTE}
LISTS = frozenset({Operator.IN, Operator.NOT_IN})
TEXT_MATCHES = frozenset({Operator.CONTAINS, Operator.STARTS_WITH})
PRESENCE = frozenset({Operator.EXISTS, Operator.NOT_EXISTS})

_DURATION_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
_RULE_KEYS = ("all", "any", "not", "performed", "trait", "in_audience")
_PERFORMED_KEYS = ("performed", "where", "count", "within", "between")


@dataclass(frozen=True, slots=True)
class Condition:
    """`key` compared by `operator`; `value` is a scalar, a tuple (in/not_in) or None (exists)."""

    key: str
    operator: Operator
    value: Scalar | tuple[Scalar, ...] | None


@dataclass(frozen=True, slots=True)
class Count:
    kind: CountKind = CountKind.AT_LEAST
    times: int = 1


@dataclass(frozen=True, slots=True)
class Window:
    """Events with `now - oldest <= timestamp <= now - newest`, both ends included."""

    oldest: timedelta
    newest: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class Performed:
    event: str
    where: tuple[Condition, ...] = ()
    count: Count = Count()
    window: Window | None = None  # None: all time


@dataclass(frozen=True, slots=True)
class Trait:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class InAudience:
    audience: str


@dataclass(frozen=True, slots=True)
class All:
    rules: tuple["Rule", ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    rules: tuple["Rule", ...]


@dataclass(frozen=True, slots=True)
class Not:
    rule: "Rule"


Rule: TypeAlias = All | AnyOf | Not | Performed | Trait | InAudience


def parse_rules(data: object, *, at: str = "rules") -> Rule:
    """The rule tree of an audience's `rules:` value; ConfigError naming `at` and the choices."""
    if not isinstance(data, dict) or (len(data) != 1 and "performed" not in data):
        raise ConfigError(
            f"{at}: a rule is a mapping with one of {', '.join(_RULE_KEYS)}, got {_show(data)}"
        )
    rule = cast(dict[object, object], data)
    if "performed" in rule:
        return _parse_performed(rule, at)
    ((key, value),) = rule.items()
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{at}.{key}: expected a non-empty list of rules, got {_show(value)}")
        rules = tuple(parse_rules(item, at=f"{at}.{key}[{i}]") for i, item in enumerate(value))
        return All(rules) if key == "all" else AnyOf(rules)
    if key == "not":
        return Not(parse_rules(value, at=f"{at}.not"))
    if key == "trait":
        return Trait(_parse_conditions(value, f"{at}.trait"))
    if key == "in_audience":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{at}.in_audience: expected an audience name, got {_show(value)}")
        return InAudience(value.strip())
    raise ConfigError(f"{at}: unknown rule {key!r}; valid rules: {', '.join(_RULE_KEYS)}")


def parse_duration(value: object, *, at: str) -> timedelta:
    """`30m`, `12h` or `90d` as a timedelta."""
    text = value.strip() if isinstance(value, str) else ""
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or unit not in _DURATION_UNITS:
        raise ConfigError(
            f"{at}: {_show(value)} is not a duration; write a whole number followed by "
            "m (minutes), h (hours) or d (days), e.g. 30d"
        )
    return int(number) * _DURATION_UNITS[unit]


def referenced_audiences(rule: Rule) -> set[str]:
    """The audiences an `in_audience` of this tree names (not those of the audiences named)."""
    if isinstance(rule, All | AnyOf):
        return set().union(*(referenced_audiences(r) for r in rule.rules))
    if isinstance(rule, Not):
        return referenced_audiences(rule.rule)
    return {rule.audience} if isinstance(rule, InAudience) else set()


def _parse_performed(rule: dict[object, object], at: str) -> Performed:
    unknown = [k for k in rule if k not in _PERFORMED_KEYS]
    if unknown:
        raise ConfigError(
            f"{at}: unknown key {_show(unknown[0])} in a performed rule; valid keys: "
            f"{', '.join(_PERFORMED_KEYS)}"
        )
    event = rule["performed"]
    if not isinstance(event, str) or not event.strip():
        raise ConfigError(f"{at}.performed: expected an event name, got {_show(event)}")
    where = _parse_conditions(rule["where"], f"{at}.where") if "where" in rule else ()
    if "within" in rule and "between" in rule:
        raise ConfigError(f"{at}: give `within` or `between`, not both")
    window = None
    if "within" in rule:
        window = Window(parse_duration(rule["within"], at=f"{at}.within"))
    elif "between" in rule:
        window = _parse_between(rule["between"], f"{at}.between")
    count = _parse_count(rule["count"], f"{at}.count") if "count" in rule else Count()
    return Performed(event.strip(), where, count, window)


def _parse_between(value: object, at: str) -> Window:
    if not isinstance(value, list) or len(value) != 2:
        raise ConfigError(f"{at}: expected two durations, oldest first (e.g. [90d, 30d])")
    oldest = parse_duration(value[0], at=f"{at}[0]")
    newest = parse_duration(value[1], at=f"{at}[1]")
    if oldest <= newest:
        raise ConfigError(
            f"{at}: the first duration ({value[0]}) must be longer than the second ({value[1]}): "
            "`between: [90d, 30d]` means from 90 days ago to 30 days ago"
        )
    return Window(oldest, newest)


def _parse_count(value: object, at: str) -> Count:
    choices = ", ".join(k.value for k in CountKind)
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{at}: expected one of {choices} with a number, e.g. {{at_least: 2}}")
    ((kind, times),) = cast(dict[object, object], value).items()
    if kind not in set(CountKind):
        raise ConfigError(f"{at}: unknown count {_show(kind)}; valid counts: {choices}")
    if isinstance(times, bool) or not isinstance(times, int) or times < 0:
        raise ConfigError(f"{at}.{kind}: expected a whole number >= 0, got {_show(times)}")
    return Count(CountKind(str(kind)), times)


def _parse_conditions(value: object, at: str) -> tuple[Condition, ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(
            f"{at}: expected a mapping of names to conditions, e.g. {{plan: {{eq: pro}}}}"
        )
    conditions = []
    for key, test in cast(dict[object, object], value).items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{at}: expected a property or trait name, got {_show(key)}")
        conditions.extend(_parse_tests(key.strip(), test, f"{at}.{key}"))
    return tuple(conditions)


def _parse_tests(key: str, value: object, at: str) -> list[Condition]:
    choices = ", ".join(o.value for o in Operator)
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{at}: expected a mapping of operators to values, e.g. {{eq: pro}}")
    conditions = []
    for name, operand in cast(dict[object, object], value).items():
        if name not in set(Operator):
            raise ConfigError(f"{at}: unknown operator {_show(name)}; valid operators: {choices}")
        operator = Operator(str(name))
        conditions.append(Condition(key, operator, _operand(operator, operand, f"{at}.{name}")))
    return conditions


def _operand(operator: Operator, value: object, at: str) -> Scalar | tuple[Scalar, ...] | None:
    if operator in PRESENCE:
        if value not in (True, None):
            raise ConfigError(f"{at}: takes no value (write `{operator}: true`)")
        return None
    if operator in LISTS:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{at}: expected a non-empty list of values, got {_show(value)}")
        return tuple(_scalar(item, f"{at}[{i}]") for i, item in enumerate(value))
    scalar = _scalar(value, at)
    if operator in TEXT_MATCHES and (not isinstance(scalar, str) or not scalar):
        raise ConfigError(f"{at}: expected non-empty text, got {_show(value)}")
    return scalar


def _scalar(value: object, at: str) -> Scalar:
    if not isinstance(value, str | int | float | bool):
        raise ConfigError(f"{at}: expected a text, number or true/false value, got {_show(value)}")
    return value


def _show(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."
