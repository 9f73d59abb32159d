"""The rule grammar: what parses to what, and the message for every bad input."""

from datetime import timedelta

import pytest

from worker.errors import ConfigError
from worker.rules.grammar import (
    All,
    AnyOf,
    Condition,
    Count,
    CountKind,
    InAudience,
    Not,
    Operator,
    Performed,
    Trait,
    Window,
    parse_duration,
    parse_rules,
    referenced_audiences,
)


def test_the_example_of_the_readme_parses() -> None:
    rules = {
        "all": [
            {
                "performed": "Order Completed",
                "where": {"revenue": {"gte": 50}, "currency": {"eq": "EUR"}},
                "count": {"at_least": 2},
                "within": "30d",
            },
            {"trait": {"plan": {"eq": "pro"}}},
            {"not": {"performed": "Order Refunded", "within": "30d"}},
            {"in_audience": "newsletter_subscribers"},
        ]
    }
    assert parse_rules(rules) == All(
        (
            Performed(
                "Order Completed",
                (
                    Condition("revenue", Operator.GTE, 50),
                    Condition("currency", Operator.EQ, "EUR"),
                ),
                Count(CountKind.AT_LEAST, 2),
                Window(timedelta(days=30)),
            ),
            Trait((Condition("plan", Operator.EQ, "pro"),)),
            Not(Performed("Order Refunded", window=Window(timedelta(days=30)))),
            InAudience("newsletter_subscribers"),
        )
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"performed": "Signed Up"}, Performed("Signed Up")),
        (
            {"performed": "Signed Up", "between": ["90d", "30d"], "count": {"exactly": 0}},
            Performed(
                "Signed Up",
                count=Count(CountKind.EXACTLY, 0),
                window=Window(timedelta(days=90), timedelta(days=30)),
            ),
        ),
        (
            {"any": [{"trait": {"plan": {"in": ["pro", "team"]}}}, {"in_audience": " vip "}]},
            AnyOf((Trait((Condition("plan", Operator.IN, ("pro", "team")),)), InAudience("vip"))),
        ),
        (
            {"trait": {"email": {"exists": True}}},
            Trait((Condition("email", Operator.EXISTS, None),)),
        ),
        (
            {"trait": {"email": {"not_exists": None}}},
            Trait((Condition("email", Operator.NOT_EXISTS, None),)),
        ),
    ],
)
def test_rules_parse(data: object, expected: object) -> None:
    assert parse_rules(data) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("15m", timedelta(minutes=15)), ("12h", timedelta(hours=12)), (" 30d ", timedelta(days=30))],
)
def test_durations_parse(text: str, expected: timedelta) -> None:
    assert parse_duration(text, at="within") == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("everyone", "rules: a rule is a mapping with one of all, any, not, performed, trait"),
        ({"all": [], "any": []}, "rules: a rule is a mapping with one of"),
        ({"every": [{"performed": "X"}]}, "unknown rule 'every'; valid rules: all, any, not"),
        ({"all": []}, "rules.all: expected a non-empty list of rules"),
        ({"any": {"performed": "X"}}, "rules.any: expected a non-empty list of rules"),
        ({"not": {"performd": "X"}}, "rules.not: unknown rule 'performd'"),
        ({"all": [{"performed": ""}]}, "rules.all[0].performed: expected an event name"),
        ({"performed": "X", "when": "3d"}, "unknown key 'when' in a performed rule; valid keys:"),
        ({"performed": "X", "within": "30"}, "rules.within: '30' is not a duration"),
        ({"performed": "X", "within": "30w"}, "m (minutes), h (hours) or d (days)"),
        ({"performed": "X", "within": 30}, "rules.within: 30 is not a duration"),
        ({"performed": "X", "within": "-3d"}, "'-3d' is not a duration"),
        ({"performed": "X", "within": "3d", "between": ["9d", "3d"]}, "`within` or `between`"),
        ({"performed": "X", "between": ["3d"]}, "rules.between: expected two durations"),
        ({"performed": "X", "between": ["3d", "9d"]}, "must be longer than the second"),
        ({"performed": "X", "between": ["9d", "3x"]}, "rules.between[1]: '3x' is not a duration"),
        ({"performed": "X", "count": 2}, "rules.count: expected one of at_least, at_most, exactly"),
        ({"performed": "X", "count": {"more_than": 2}}, "unknown count 'more_than'; valid counts"),
        ({"performed": "X", "count": {"at_least": -1}}, "at_least: expected a whole number >= 0"),
        ({"performed": "X", "count": {"at_least": True}}, "expected a whole number >= 0"),
        ({"performed": "X", "where": []}, "rules.where: expected a mapping of names to conditions"),
        ({"performed": "X", "where": {"total": 5}}, "rules.where.total: expected a mapping of"),
        (
            {"performed": "X", "where": {"total": {"greater": 5}}},
            "rules.where.total: unknown operator 'greater'; valid operators: eq, ne, gt, gte, lt, "
            "lte, in, not_in, contains, starts_with, exists, not_exists",
        ),
        ({"trait": {"plan": {"in": []}}}, "rules.trait.plan.in: expected a non-empty list"),
        ({"trait": {"plan": {"in": "pro"}}}, "rules.trait.plan.in: expected a non-empty list"),
        ({"trait": {"plan": {"in": ["a", ["b"]]}}}, "rules.trait.plan.in[1]: expected a text"),
        ({"trait": {"plan": {"eq": None}}}, "rules.trait.plan.eq: expected a text, number"),
        ({"trait": {"plan": {"eq": {"a": 1}}}}, "rules.trait.plan.eq: expected a text, number"),
        (
            {"trait": {"plan": {"contains": 5}}},
            "rules.trait.plan.contains: expected non-empty text",
        ),
        ({"trait": {"plan": {"starts_with": ""}}}, "starts_with: expected non-empty text"),
        ({"trait": {"plan": {"exists": "yes"}}}, "rules.trait.plan.exists: takes no value"),
        ({"trait": {}}, "rules.trait: expected a mapping of names to conditions"),
        ({"trait": {5: {"eq": 1}}}, "rules.trait: expected a property or trait name, got 5"),
        ({"in_audience": ["a", "b"]}, "rules.in_audience: expected an audience name"),
    ],
)
def test_bad_rules_are_refused_naming_what_is_wrong(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_rules(data)
    assert message in str(raised.value)


def test_referenced_audiences_are_found_at_any_depth() -> None:
    rules = parse_rules(
        {
            "all": [
                {"in_audience": "a"},
                {"not": {"any": [{"in_audience": "b"}, {"performed": "X"}]}},
            ]
        }
    )
    assert referenced_audiences(rules) == {"a", "b"}
