"""Compiled rule audiences against the reference evaluator, on random data, on every dialect."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from tests.rules.evaluator import Dataset, evaluate
from tests.rules.warehouse import DIALECTS, SERVER_MARKS, load, warehouse
from worker.rules.compiler import compile_audience
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
    Rule,
    Trait,
    Window,
)
from worker.rules.layout import Layout, LayoutSpec, reflect_layout

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
NAIVE_NOW = NOW.replace(tzinfo=None)
DURATIONS = [timedelta(hours=1), timedelta(days=1), timedelta(days=7)]
USER_IDS = [f"u{i}" for i in range(6)]
ANONYMOUS_IDS = [f"a{i}" for i in range(4)]
WORDS = ["", "a", "b", "ab", "ba", "abb"]
NUMBERS = [0, 25, 49.5, 50, 100]


# Times on the window boundaries (and a minute either side) are the likeliest to differ.
BOUNDARIES = [timedelta(0), *(-d for d in DURATIONS)]
boundary_offsets = st.sampled_from(BOUNDARIES) | st.sampled_from(
    [b + s for b in BOUNDARIES for s in (timedelta(minutes=-1), timedelta(minutes=1))]
)
offsets = st.one_of(
    boundary_offsets,
    boundary_offsets,
    st.integers(-10 * 24 * 60, 60).map(lambda m: timedelta(minutes=m)),
)
moments = offsets.map(lambda offset: NAIVE_NOW + offset)
# Few identify times, so that one anonymous id is often identified twice at the same time.
identify_moments = st.sampled_from(
    [None, NAIVE_NOW - timedelta(days=2), NAIVE_NOW - timedelta(hours=2)]
)
words = st.none() | st.sampled_from(WORDS)
numbers = st.none() | st.sampled_from(NUMBERS)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    users = [
        {
            "id": user_id,
            "email": draw(st.none() | st.just(f"{user_id}@example.com")),
            "plan": draw(words),
            "age": draw(st.none() | st.sampled_from([18, 30, 50])),
        }
        for user_id in draw(st.lists(st.sampled_from(USER_IDS[:5]), unique=True, max_size=5))
    ]
    # u5 has events and identifies but no users row: never a member.
    someone = st.sampled_from(USER_IDS)
    identifies = [
        {"id": f"i{i}", "anonymous_id": anonymous, "user_id": user, "timestamp": moment}
        for i, (anonymous, user, moment) in enumerate(
            draw(
                st.lists(
                    st.tuples(
                        st.none() | st.sampled_from(ANONYMOUS_IDS), someone, identify_moments
                    ),
                    max_size=6,
                )
            )
        )
    ]
    events: dict[str, list[dict[str, Any]]] = {"order_completed": [], "page_viewed": []}
    for i in range(draw(st.integers(0, 16))):
        table = draw(st.sampled_from(sorted(events)))
        user = draw(st.none() | someone)
        anonymous = (
            draw(st.sampled_from(ANONYMOUS_IDS))
            if user is None
            else draw(st.none() | st.sampled_from(ANONYMOUS_IDS))
        )
        row = {
            "id": f"e{i}",
            "anonymous_id": anonymous,
            "user_id": user,
            "timestamp": draw(moments),
        }
        if table == "order_completed":
            row |= {"revenue": draw(numbers), "currency": draw(words)}
        else:
            row |= {"path": draw(words)}
        events[table].append(row)
    return Dataset(users, identifies, events)


def conditions(columns: dict[str, str]) -> st.SearchStrategy[Condition]:
    """A condition on one of `columns` (name -> text or number) with a value that fits it."""

    @st.composite
    def condition(draw: st.DrawFn) -> Condition:
        key = draw(st.sampled_from(sorted(columns)))
        is_text = columns[key] == "text"
        operators = (
            list(Operator)
            if is_text
            else [o for o in Operator if o not in (Operator.CONTAINS, Operator.STARTS_WITH)]
        )
        operator = draw(st.sampled_from(operators))
        values = st.sampled_from(WORDS if is_text else NUMBERS)
        if operator in (Operator.EXISTS, Operator.NOT_EXISTS):
            return Condition(key, operator, None)
        if operator in (Operator.IN, Operator.NOT_IN):
            return Condition(key, operator, tuple(draw(st.lists(values, min_size=1, max_size=3))))
        if operator in (Operator.CONTAINS, Operator.STARTS_WITH):
            return Condition(key, operator, draw(st.sampled_from(WORDS[1:])))
        return Condition(key, operator, draw(values))

    return condition()


windows = st.none() | st.sampled_from(
    [Window(d) for d in DURATIONS]
    + [Window(timedelta(days=7), timedelta(days=1)), Window(timedelta(days=1), timedelta(hours=1))]
)
counts = st.builds(Count, st.sampled_from(list(CountKind)), st.integers(0, 3))
performed = st.one_of(
    st.builds(
        Performed,
        st.just("Order Completed"),
        st.lists(conditions({"revenue": "number", "currency": "text"}), max_size=2).map(tuple),
        counts,
        windows,
    ),
    st.builds(
        Performed,
        st.just("Page Viewed"),
        st.lists(conditions({"path": "text"}), max_size=1).map(tuple),
        counts,
        windows,
    ),
)
traits = st.builds(
    Trait,
    st.lists(conditions({"plan": "text", "age": "number"}), min_size=1, max_size=2).map(tuple),
)


def rule_trees(leaves: st.SearchStrategy[Rule]) -> st.SearchStrategy[Rule]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=3).map(lambda rs: All(tuple(rs))),
            st.lists(inner, min_size=1, max_size=3).map(lambda rs: AnyOf(tuple(rs))),
            inner.map(Not),
        ),
        max_leaves=5,
    )


plain_rules = rule_trees(st.one_of(performed, traits))
rules = rule_trees(st.one_of(performed, traits, st.just(InAudience("other"))))


@pytest.fixture(
    scope="module",
    params=[pytest.param(d, marks=SERVER_MARKS.get(d, [])) for d in DIALECTS],
)
def source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, Layout]]:
    dialect = str(request.param)
    with warehouse(dialect, Path(tmp_path_factory.mktemp(dialect))) as engine:
        yield engine, reflect_layout(engine, LayoutSpec())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=datasets(),
    trees=st.lists(rules, min_size=1, max_size=3),
    other=plain_rules,
    include_anonymous=st.booleans(),
)
def test_compiled_members_equal_the_evaluators(
    source: tuple[Engine, Layout],
    data: Dataset,
    trees: list[Rule],
    other: Rule,
    include_anonymous: bool,
) -> None:
    engine, layout = source
    load(engine, data)
    audiences: dict[str, Rule | str] = {"other": other}
    for tree in trees:
        query = compile_audience(
            tree,
            layout,
            now=NOW,
            audience="this",
            include_anonymous=include_anonymous,
            resolve=audiences.__getitem__,
        )
        with engine.connect() as connection:
            rows = connection.execute(query).all()
        compiled = {
            (r.user_id, r.anonymous_id if include_anonymous else None, r.email) for r in rows
        }
        assert len(compiled) == len(rows), "a member is listed twice"
        expected = evaluate(
            tree, data, now=NAIVE_NOW, include_anonymous=include_anonymous, audiences=audiences
        )
        assert compiled == expected, tree
