"""Checking a rule tree against a source's reflected layout, naming where in `rules:` each
problem is.

The compiler refuses the same names, but without saying which rule of the tree holds them:
`apply` calls `check_rules` first, so a bad event, property or trait, or a value of the wrong
kind, is reported at its own line of the file. The paths are those `parse_rules` uses
(`rules.all[0].where.revenue`).
"""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Table

from worker.errors import ConfigError
from worker.rules.grammar import All, AnyOf, Condition, Not, Performed, Rule, Trait
from worker.rules.layout import Layout, check_condition


def walk_rules(rule: Rule, at: str = "rules") -> Iterator[tuple[str, Rule]]:
    """Every rule of the tree, outermost first, with its path in `rules:`."""
    yield at, rule
    if isinstance(rule, All | AnyOf):
        key = "all" if isinstance(rule, All) else "any"
        for index, inner in enumerate(rule.rules):
            yield from walk_rules(inner, f"{at}.{key}[{index}]")
    elif isinstance(rule, Not):
        yield from walk_rules(rule.rule, f"{at}.not")


def check_rules(rule: Rule, layout: Layout, *, include_anonymous: bool = False) -> None:
    """ConfigError `PATH: problem` for the first event, property or trait the layout lacks,
    or the first value that cannot be compared with its column."""
    if include_anonymous:
        with _at("include_anonymous"):
            layout.tracks  # noqa: B018 (anonymous members are read from `tracks`)
    for at, node in walk_rules(rule):
        if isinstance(node, Performed):
            with _at(f"{at}.performed"):
                events = layout.event_table(node.event)
            what = f"performed {node.event!r}"
            for condition in node.where:
                _check(layout, events, condition, f"{at}.where.{condition.key}", what)
        elif isinstance(node, Trait):
            for condition in node.conditions:
                _check(layout, layout.users, condition, f"{at}.trait.{condition.key}", "trait")


def _check(layout: Layout, table: Table, condition: Condition, at: str, what: str) -> None:
    with _at(at):
        column = layout.column(table, condition.key, what=what)
    with _at(f"{at}.{condition.operator}"):
        check_condition(column, condition, what=what)


@contextmanager
def _at(at: str) -> Iterator[None]:
    """Prefix a ConfigError raised inside with its path in `rules:`."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
