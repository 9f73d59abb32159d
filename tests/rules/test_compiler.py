"""The layout checks and the compiler's contract: names refused, values bound, cycles refused."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

from tests.rules.evaluator import Dataset
from tests.rules.warehouse import DIALECTS, SERVER_MARKS, load, metadata, warehouse
from worker.errors import ConfigError, SourceError
from worker.rules.compiler import compile_audience, render_sql
from worker.rules.grammar import Rule, parse_rules
from worker.rules.layout import (
    Layout,
    LayoutSpec,
    column_name_of_property,
    parse_layout_spec,
    reflect_layout,
    table_name_of_event,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SQL_LOOKING = "x'; DROP TABLE users; --"


@pytest.fixture
def source(tmp_path: Path) -> Iterator[tuple[Engine, Layout]]:
    with warehouse("sqlite", tmp_path) as engine:
        now = NOW.replace(tzinfo=None)
        load(
            engine,
            Dataset(
                users=[
                    {"id": "u1", "email": "one@example.com", "plan": "pro", "age": 30},
                    {"id": "u2", "email": SQL_LOOKING, "plan": "free", "age": None},
                ],
                identifies=[
                    {"id": "i1", "anonymous_id": "a1", "user_id": "u2", "timestamp": now},
                ],
                events={
                    "order_completed": [
                        {
                            "id": "e1",
                            "anonymous_id": "a1",
                            "user_id": None,
                            "timestamp": now - timedelta(days=1),
                            "revenue": 60.0,
                            "currency": "EUR",
                        }
                    ],
                    "page_viewed": [
                        {
                            "id": "e2",
                            "anonymous_id": "a9",
                            "user_id": None,
                            "timestamp": now,
                            "path": "/",
                        }
                    ],
                },
            ),
        )
        yield engine, reflect_layout(engine, LayoutSpec())


def members(
    source: tuple[Engine, Layout], rules: object, **options: object
) -> set[tuple[object, ...]]:
    engine, layout = source
    query = compile_audience(parse_rules(rules), layout, now=NOW, audience="this", **options)  # type: ignore[arg-type]
    with engine.connect() as connection:
        return {tuple(row) for row in connection.execute(query)}


@pytest.mark.parametrize(
    ("name", "table"),
    [
        ("Order Completed", "order_completed"),
        ("OrderCompleted", "order_completed"),
        ("order_completed", "order_completed"),
        ("Checkout Step-Viewed", "checkout_step_viewed"),
        ("Signed Up (v2)", "signed_up_v2"),
    ],
)
def test_event_tables_are_named_as_segment_names_them(name: str, table: str) -> None:
    assert table_name_of_event(name) == table


@pytest.mark.parametrize(
    ("key", "name"), [("revenue", "revenue"), ("orderId", "order_id"), ("Plan Name", "plan_name")]
)
def test_property_columns_are_snake_cased(key: str, name: str) -> None:
    assert column_name_of_property(key) == name


def test_a_stitched_anonymous_event_counts_for_its_user(source: tuple[Engine, Layout]) -> None:
    rules = {"performed": "Order Completed", "where": {"revenue": {"gte": 50}}, "within": "7d"}
    assert members(source, rules) == {("u2", SQL_LOOKING)}
    assert members(source, {"performed": "Page Viewed"}, include_anonymous=True) == {
        (None, None, "a9")
    }


def test_a_trait_compared_with_null_is_false_and_its_negation_true(
    source: tuple[Engine, Layout],
) -> None:
    adults = {"trait": {"age": {"gte": 18}}}
    assert members(source, adults) == {("u1", "one@example.com")}
    assert members(source, {"not": adults}) == {("u2", SQL_LOOKING)}
    assert members(source, {"not": {"not": {"not": adults}}}) == {("u2", SQL_LOOKING)}
    either = {"any": [adults, {"performed": "Order Completed"}]}
    assert members(source, either) == {("u1", "one@example.com"), ("u2", SQL_LOOKING)}
    assert members(source, {"all": [{"not": adults}, either]}) == {("u2", SQL_LOOKING)}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            {"performed": "Order Refunded"},
            "event 'Order Refunded': no table 'order_refunded'; event tables: "
            "order_completed, page_viewed",
        ),
        (
            {"performed": "Order Completed", "where": {"total": {"gt": 5}}},
            "performed 'Order Completed': no column 'total' in table 'order_completed'; columns: "
            "anonymous_id, currency, id, revenue, timestamp, user_id",
        ),
        (
            {"trait": {"plan": {"gt": 5}}},
            "column 'plan' holds text but plan.gt compares it with a number 5",
        ),
        (
            {"performed": "Order Completed", "where": {"revenue": {"in": [5, "50"]}}},
            "column 'revenue' holds number but revenue.in compares it with text '50'",
        ),
        ({"trait": {"age": {"contains": "3"}}}, "`contains` works on text columns only"),
        ({"trait": {"age": {"eq": True}}}, None),  # MySQL keeps booleans as integers
        (
            {"performed": "Order Completed", "where": {"timestamp": {"gt": "2026-01-01"}}},
            "compare event times with `within` or `between`",
        ),
        ({"in_audience": "nobody"}, "in_audience 'nobody': no audience named 'nobody'"),
    ],
)
def test_rules_naming_what_does_not_exist_are_refused(
    source: tuple[Engine, Layout], rules: object, message: str | None
) -> None:
    if message is None:
        members(source, rules)
        return
    with pytest.raises(ConfigError) as raised:
        members(source, rules)
    assert message in str(raised.value)


def test_a_source_without_the_layout_tables_is_refused(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with engine.begin() as connection:
        connection.execute(text("create table people (id text)"))
    with pytest.raises(ConfigError, match="the users table 'users' does not exist; tables: people"):
        reflect_layout(engine, LayoutSpec())
    with pytest.raises(ConfigError, match="tables: people"):
        reflect_layout(engine, LayoutSpec(users="people"))  # no identifies either
    with pytest.raises(ConfigError, match="unknown layout 'snowplow'; valid layouts: segment"):
        LayoutSpec(layout="snowplow")
    engine.dispose()


def test_an_unreadable_source_is_a_source_error(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(SourceError, match="cannot read the tables of the source"):
        reflect_layout(engine, LayoutSpec())


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql", "duckdb"])
def test_a_value_that_looks_like_sql_stays_a_bound_parameter(
    source: tuple[Engine, Layout], dialect: str
) -> None:
    engine, layout = source
    rules = parse_rules({"trait": {"email": {"eq": SQL_LOOKING}}})
    query = compile_audience(rules, layout, now=NOW, audience="this")
    sql, parameters = render_sql(query, dialect)
    assert "DROP" not in sql
    assert SQL_LOOKING in parameters.values()
    with engine.connect() as connection:
        assert connection.execute(query).all() == [("u2", SQL_LOOKING)]
    assert "users" in inspect(engine).get_table_names()


def test_now_is_a_bound_parameter(source: tuple[Engine, Layout]) -> None:
    _, layout = source
    query = compile_audience(
        parse_rules({"performed": "Page Viewed", "within": "1h"}), layout, now=NOW, audience="this"
    )
    sql, parameters = render_sql(query, layout.dialect)
    naive = NOW.replace(tzinfo=None)
    assert {naive, naive - timedelta(hours=1)} <= set(parameters.values())
    assert "2026" not in sql
    with pytest.raises(ValueError, match="timezone-aware"):
        compile_audience(parse_rules({"performed": "Page Viewed"}), layout, now=naive, audience="x")


def test_in_audience_inlines_rules_and_sql_audiences(source: tuple[Engine, Layout]) -> None:
    audiences: dict[str, Rule | str] = {
        "pro": parse_rules({"trait": {"plan": {"eq": "pro"}}}),
        "free_sql": "select id as user_id, email from users where plan = 'free'",
    }
    resolve = audiences.__getitem__
    assert members(source, {"in_audience": "pro"}, resolve=resolve) == {("u1", "one@example.com")}
    assert members(source, {"in_audience": "free_sql"}, resolve=resolve) == {("u2", SQL_LOOKING)}
    assert members(source, {"not": {"in_audience": "free_sql"}}, resolve=resolve) == {
        ("u1", "one@example.com")
    }


@pytest.mark.parametrize(
    ("audiences", "message"),
    [
        ({"this": {"in_audience": "this"}}, "in_audience makes a cycle: this -> this"),
        (
            {
                "this": {"all": [{"trait": {"plan": {"eq": "pro"}}}, {"in_audience": "b"}]},
                "b": {"any": [{"performed": "Page Viewed"}, {"not": {"in_audience": "c"}}]},
                "c": {"in_audience": "b"},
            },
            "in_audience makes a cycle: b -> c -> b",
        ),
    ],
)
def test_cycles_of_in_audience_are_refused(
    source: tuple[Engine, Layout], audiences: dict[str, object], message: str
) -> None:
    _, layout = source
    parsed: dict[str, Rule | str] = {name: parse_rules(rules) for name, rules in audiences.items()}
    with pytest.raises(ConfigError) as raised:
        compile_audience(
            parsed["this"], layout, now=NOW, audience="this", resolve=parsed.__getitem__
        )
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "dialect", [pytest.param("postgresql", marks=pytest.mark.postgres), "duckdb"]
)
def test_the_tables_of_the_layouts_schema_are_read(dialect: str, tmp_path: Path) -> None:
    with warehouse(dialect, tmp_path) as engine:
        with engine.begin() as connection:
            connection.execute(text("CREATE SCHEMA analytics"))
        in_schema = engine.execution_options(schema_translate_map={None: "analytics"})
        metadata.create_all(in_schema)
        load(in_schema, Dataset(users=[{"id": "u7", "email": None, "plan": "pro", "age": 3}]))
        layout = reflect_layout(engine, LayoutSpec(schema="analytics"))
        query = compile_audience(
            parse_rules({"trait": {"plan": {"eq": "pro"}}}), layout, now=NOW, audience="this"
        )
        assert "analytics" in render_sql(query, engine.dialect)[0]
        with engine.connect() as connection:
            assert connection.execute(query).all() == [("u7", None)]


@pytest.mark.parametrize(
    "dialect", [pytest.param(d, marks=SERVER_MARKS.get(d, [])) for d in DIALECTS]
)
@pytest.mark.parametrize(
    ("condition", "is_member"),
    [
        ({"gt": 29.5}, True),
        ({"gte": 30.5}, False),
        ({"lt": 30.5}, True),
        ({"eq": 29.6}, False),
        ({"ne": 30.4}, True),
        ({"in": [0, 29.6]}, False),
        ({"not_in": [30.4]}, True),
    ],
)
def test_a_fraction_compares_with_a_whole_number_column_unrounded(
    dialect: str, condition: dict[str, object], is_member: bool, tmp_path: Path
) -> None:
    with warehouse(dialect, tmp_path) as engine:
        load(engine, Dataset(users=[{"id": "u1", "email": None, "plan": None, "age": 30}]))
        layout = reflect_layout(engine, LayoutSpec())
        rules = parse_rules({"trait": {"age": condition}})
        query = compile_audience(rules, layout, now=NOW, audience="this")
        with engine.connect() as connection:
            assert (connection.execute(query).all() == [("u1", None)]) is is_member


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"url": "sqlite://", "layout": "segment"}, LayoutSpec()),
        (
            {"layout": "segment", "schema": "analytics", "users": "people", "tracks": "events"},
            LayoutSpec(schema="analytics", users="people", tracks="events"),
        ),
    ],
)
def test_layout_settings_parse(data: object, expected: LayoutSpec) -> None:
    assert parse_layout_spec(data) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"url": "sqlite://"},
            "source: rule audiences need a source with a layout; valid layouts: ",
        ),
        ({"layout": "rudder"}, "unknown layout 'rudder'; valid layouts: segment"),
        ({"layout": "segment", "schema": 5}, "source.schema: expected a name, got 5"),
        ("segment", "source: expected a mapping with `layout: segment`"),
    ],
)
def test_bad_layout_settings_are_refused(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_layout_spec(data)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("rules", "shape"),
    [
        ({"not": {"performed": "Page Viewed"}}, "NOT (EXISTS (SELECT"),
        ({"performed": "Page Viewed", "count": {"at_most": 1}}, "NOT (EXISTS (SELECT"),
        ({"all": [{"trait": {"plan": {"eq": "pro"}}}, {"not": {"in_audience": "pro"}}]}, "EXISTS"),
        ({"any": [{"trait": {"age": {"gt": 3}}}, {"not": {"performed": "Page Viewed"}}]}, "NOT IN"),
    ],
)
def test_a_negation_among_the_wheres_terms_is_not_exists(
    source: tuple[Engine, Layout], rules: object, shape: str
) -> None:
    """NOT EXISTS becomes an anti-join on PostgreSQL; NOT IN is probed row by row there once
    the list outgrows memory. Below `any` an EXISTS would be a subplan per row all the same."""
    _, layout = source
    resolve = {"pro": parse_rules({"trait": {"plan": {"eq": "pro"}}})}.__getitem__
    query = compile_audience(parse_rules(rules), layout, now=NOW, audience="x", resolve=resolve)
    sql = render_sql(query, "postgresql")[0]
    assert shape in sql
    assert ("NOT IN" in sql) is (shape == "NOT IN")
