"""Rule audiences through the product: `apply` checks the rules against the source's tables,
each run compiles them for its own start and syncs them exactly as a SQL audience; `audiences
show --sql` and `audiences preview`; bad rules refused in one line, nothing changed."""

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Engine, create_engine, func, inspect, select

from models import Audience, Source
from tests.rules.evaluator import Dataset
from tests.rules.warehouse import load, metadata, warehouse
from worker import db
from worker.config import load_config
from worker.domain import SyncRequest
from worker.errors import ConfigError
from worker.rules import LayoutSpec, compile_audience, parse_rules, reflect_layout
from worker.runtime import Runtime
from worker.service import SyncService
from worker.sources import copy_rows, copy_statement, dispose_source_engines
from worker.testing.factories import apply_file, read_calls, sync_all
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import dump_database, error_lines, invoke, ortto_destination

KEY = "repeat_buyers"
# Inlined into the SQL, it would select every user; bound, only the user with that plan.
SQL_LOOKING = "x' OR '1'='1"
RULES: dict[str, Any] = {
    "all": [
        {
            "performed": "Order Completed",
            "where": {"revenue": {"gte": 50}},
            "count": {"at_least": 2},
            "within": "30d",
        },
        {"any": [{"trait": {"plan": {"in": ["pro", "team"]}}}, {"in_audience": "vip_list"}]},
        {"not": {"performed": "Page Viewed", "where": {"path": {"eq": "/cancel"}}, "within": "7d"}},
    ]
}


def _ago(days: float) -> datetime:
    return (datetime.now(UTC) - timedelta(days=days)).replace(tzinfo=None)


def _order(n: int, user: str | None, days: float, revenue: float, anonymous: str = "") -> dict:
    return {
        "id": f"o{n}",
        "user_id": user,
        "anonymous_id": anonymous or f"anon-{user}",
        "timestamp": _ago(days),
        "revenue": revenue,
        "currency": "EUR",
    }


def _view(n: int, user: str, days: float, path: str) -> dict[str, Any]:
    return {
        "id": f"v{n}",
        "user_id": user,
        "anonymous_id": f"anon-{user}",
        "timestamp": _ago(days),
        "path": path,
    }


def _shop() -> Dataset:
    """u1: two big orders, pro. u2: one big order, one more before login (anonymous id
    `a2`, identified as u2). u3: not pro, but in the SQL audience vip_list (age 70). u4: one
    order too small. u5: viewed /cancel yesterday. u6: one order too old. u7: not pro."""
    users = [
        {"id": "u1", "email": "u1@example.com", "plan": "pro", "age": 30},
        {"id": "u2", "email": "u2@example.com", "plan": "pro", "age": 40},
        {"id": "u3", "email": "u3@example.com", "plan": "free", "age": 70},
        {"id": "u4", "email": "u4@example.com", "plan": "pro", "age": 20},
        {"id": "u5", "email": "u5@example.com", "plan": "pro", "age": 20},
        {"id": "u6", "email": "u6@example.com", "plan": "pro", "age": 20},
        {"id": "u7", "email": "u7@example.com", "plan": SQL_LOOKING, "age": 20},
    ]
    orders = [
        _order(1, "u1", 1, 60),
        _order(2, "u1", 3, 80),
        _order(3, "u2", 2, 55),
        _order(4, None, 5, 70, anonymous="a2"),
        _order(5, "u3", 1, 90),
        _order(6, "u3", 2, 90),
        _order(7, "u4", 1, 60),
        _order(8, "u4", 2, 40),
        _order(9, "u5", 1, 60),
        _order(10, "u5", 2, 60),
        _order(11, "u6", 1, 60),
        _order(12, "u6", 40, 60),
        _order(13, "u7", 1, 60),
        _order(14, "u7", 2, 60),
    ]
    identifies = [
        {"id": "i1", "anonymous_id": "a2", "user_id": "u2", "timestamp": _ago(4)},
    ]
    views = [_view(1, "u5", 1, "/cancel"), _view(2, "u1", 20, "/cancel")]
    return Dataset(users, identifies, {"order_completed": orders, "page_viewed": views})


@pytest.fixture
def events(backend: str, tmp_path: Path) -> Iterator[Engine]:
    """A Segment-layout warehouse on the test's backend."""
    with warehouse(backend, tmp_path) as engine:
        load(engine, _shop())
        yield engine


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _config(
    directory: Path,
    events: Engine,
    destination: dict[str, Any],
    *,
    audiences: list[dict[str, Any]] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    document = {
        "sources": {"warehouse": source or {"url": _url(events), "layout": "segment"}},
        "destinations": {"ortto": destination},
        "audiences": audiences
        if audiences is not None
        else [
            {
                "name": "Repeat Buyers",
                "source": "warehouse",
                "rules": RULES,
                "destinations": ["ortto"],
            },
            {
                "name": "VIP List",
                "source": "warehouse",
                "query": "select id as user_id, email from users where age >= 60",
                "destinations": ["ortto"],
            },
        ],
    }
    path = directory / "audiences.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_a_rule_audience_syncs_initial_then_incremental(
    tmp_path: Path, events: Engine, runtime: Runtime, fake: FakeDestinations
) -> None:
    apply_file(runtime, _config(tmp_path, events, ortto_destination(fake)))
    first = {s.audience_key: s for s in sync_all(runtime)}
    assert first[KEY].status == "succeeded" and first[KEY].mode == "initial"
    # u2's order before login counts for u2; u3 is in through the SQL audience it names.
    assert fake.state("ortto")[KEY] == {"u1": True, "u2": True, "u3": True}
    assert first[KEY].members == first[KEY].entered == first[KEY].sent == 3

    # New events: u4 orders again (in), u1 views /cancel now (out).
    shop = _shop()
    shop.events["order_completed"].append(_order(20, "u4", 0.5, 75))
    shop.events["page_viewed"].append(_view(20, "u1", 0.1, "/cancel"))
    load(events, shop)
    second = {s.audience_key: s for s in sync_all(runtime)}
    assert (second[KEY].status, second[KEY].mode) == ("succeeded", "incremental")
    assert (second[KEY].entered, second[KEY].exited, second[KEY].sent) == (1, 1, 2)
    assert fake.state("ortto")[KEY] == {"u1": False, "u2": True, "u3": True, "u4": True}
    # The SQL audience it names went the same way, untouched.
    assert second["vip_list"].sent == 0

    third = {s.audience_key: s for s in sync_all(runtime)}
    assert (third[KEY].members, third[KEY].sent) == (3, 0)


def test_each_run_compiles_for_its_own_start(
    tmp_path: Path, events: Engine, runtime: Runtime, fake: FakeDestinations
) -> None:
    """The window moves with the run's start: an order ages out with no new event at all."""
    shop = _shop()
    shop.events["order_completed"] = [
        _order(1, "u1", 29.99, 60),
        _order(2, "u1", 1, 60),
        _order(5, "u3", 1, 90),
        _order(6, "u3", 2, 90),
    ]
    load(events, shop)
    apply_file(runtime, _config(tmp_path, events, ortto_destination(fake)))
    sync_all(runtime, audience_keys=[KEY])
    assert fake.state("ortto")[KEY] == {"u1": True, "u3": True}
    later = datetime.now(UTC) + timedelta(days=1)
    # The same state database and destinations, a service whose clock is a day ahead.
    tomorrow = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        clock=lambda: later,
        env=os.environ,
    )
    [summary] = [
        tomorrow.sync_pair(pair, SyncRequest())
        for pair in tomorrow.select_pairs(audience_keys=[KEY])
    ]
    assert (summary.status, summary.exited, summary.members) == ("succeeded", 1, 1)
    assert fake.state("ortto")[KEY] == {"u1": False, "u3": True}


def test_a_value_that_looks_like_sql_stays_a_bound_parameter(
    tmp_path: Path, events: Engine, runtime: Runtime, fake: FakeDestinations
) -> None:
    audiences = [
        {
            "name": "Odd Plan",
            "source": "warehouse",
            "rules": {"trait": {"plan": {"eq": SQL_LOOKING}}},
            "destinations": ["ortto"],
        }
    ]
    apply_file(runtime, _config(tmp_path, events, ortto_destination(fake), audiences=audiences))
    [summary] = sync_all(runtime)
    assert summary.status == "succeeded"
    assert fake.state("ortto")["odd_plan"] == {"u7": True}
    assert "users" in inspect(events).get_table_names()
    with events.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(metadata.tables["users"])) == 7
    compiled = runtime.service.compiled_audience("odd_plan")
    assert SQL_LOOKING not in compiled.sql
    assert SQL_LOOKING in compiled.params.values()


def test_show_and_preview(
    tmp_path: Path, events: Engine, runtime: Runtime, cli: None, state_url: str
) -> None:
    local = {"type": "file", "path": str(tmp_path / "identify.ndjson")}
    apply_file(runtime, _config(tmp_path, events, local))

    shown = invoke("audiences", "show", KEY)
    assert shown.exit_code == 0, shown.output
    definition = yaml.safe_load(shown.stdout)
    assert definition["rules"] == RULES and definition["include_anonymous"] is False
    assert "query" not in definition

    sql = invoke("audiences", "show", KEY, "--sql")
    assert sql.exit_code == 0, sql.output
    assert sql.stdout.startswith(f"-- {KEY}: compiled for {events.dialect.name}")
    assert "order_completed" in sql.stdout and "-- parameters:" in sql.stdout
    # Values are parameters: `:name` in the SQL, the value in the comments after it.
    assert "'/cancel'" not in sql.stdout.split("-- parameters:")[0]
    assert "= '/cancel'" in sql.stdout
    # Each value of an `in` list is a parameter of its own, as the database receives them.
    assert "POSTCOMPILE" not in sql.stdout and "= 'team'" in sql.stdout

    plain = invoke("audiences", "show", "vip_list", "--sql")
    assert "select id as user_id, email from users where age >= 60;" in plain.stdout

    before = dump_database(state_url)
    preview = invoke("audiences", "preview", KEY, "--limit", "2")
    assert preview.exit_code == 0, preview.output
    lines = preview.stdout.splitlines()
    assert lines[0] == f"{KEY}: 3 members"
    assert sum(f"u{i}@example.com" in preview.stdout for i in (1, 2, 3)) == 2
    assert dump_database(state_url) == before  # nothing written, no run, no snapshot

    missing = invoke("audiences", "preview", "nope")
    assert missing.exit_code == 2
    assert "no audience with key 'nope'" in error_lines(missing)[0]


def _one_rule(rule: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    return [
        {"name": "Repeat Buyers", "source": "warehouse", "destinations": ["ortto"], "rules": rule}
        | extra
    ]


_BIG = {"performed": "Order Completed", "within": "30d"}
BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown operator": (
        {"audiences": _one_rule({**_BIG, "where": {"revenue": {"greater": 5}}})},
        "unknown operator 'greater'; valid operators: eq, ne, gt, gte",
    ),
    "unknown event": (
        {"audiences": _one_rule({"performed": "Order Shipped"})},
        "no table 'order_shipped'; event tables: order_completed, page_viewed",
    ),
    "unknown property": (
        {"audiences": _one_rule({**_BIG, "where": {"discount": {"gt": 1}}})},
        "no column 'discount' in table 'order_completed'; columns: anonymous_id, currency,",
    ),
    "unknown trait": (
        {"audiences": _one_rule({"trait": {"tier": {"eq": "gold"}}})},
        "no column 'tier' in table 'users'; columns: age, email, id, plan",
    ),
    "unknown audience": (
        {"audiences": _one_rule({"in_audience": "nobody"})},
        "unknown audience 'nobody'; audiences of source 'warehouse': repeat_buyers",
    ),
    "cycle": (
        {
            "audiences": [
                *_one_rule({"in_audience": "b"}),
                {
                    "name": "B",
                    "source": "warehouse",
                    "destinations": ["ortto"],
                    "rules": {"not": {"in_audience": "repeat_buyers"}},
                },
            ]
        },
        "makes a cycle: repeat_buyers -> b -> repeat_buyers",
    ),
    "bad duration": (
        {"audiences": _one_rule({"performed": "Order Completed", "within": "30 days"})},
        "'30 days' is not a duration; write a whole number followed by m (minutes), h (hours)",
    ),
    "text with a number": (
        {"audiences": _one_rule({**_BIG, "where": {"currency": {"eq": 5}}})},
        "column 'currency' holds text but currency.eq compares it with a number 5",
    ),
    "number with text": (
        {"audiences": _one_rule({"trait": {"age": {"gt": "30"}}})},
        "column 'age' holds number but age.gt compares it with text '30'",
    ),
    "rules and query": (
        {"audiences": _one_rule(_BIG, query="select id as user_id from users")},
        "give exactly one of `query:` (SQL) and `rules:`",
    ),
    "neither rules nor query": (
        {
            "audiences": [
                {"name": "Repeat Buyers", "source": "warehouse", "destinations": ["ortto"]}
            ]
        },
        "give exactly one of `query:` (SQL) and `rules:` (conditions on events and traits); "
        "found neither",
    ),
    "source without a layout": (
        {"audiences": _one_rule(_BIG), "source": {}},
        "rules need a source with a layout, and source 'warehouse' has none; add `layout: "
        "segment` to it (valid layouts: segment)",
    ),
    "unknown layout": (
        {"audiences": _one_rule(_BIG), "source": {"layout": "snowplow"}},
        "unknown layout 'snowplow'; valid layouts: segment",
    ),
    "missing users table": (
        {"audiences": _one_rule(_BIG), "source": {"layout": "segment", "users": "people"}},
        "the users table 'people' does not exist; tables: identifies, order_completed,",
    ),
    "include_anonymous with a query": (
        {
            "audiences": [
                {"name": "Repeat Buyers", "source": "warehouse", "destinations": ["ortto"]}
                | {"query": "select id as user_id from users", "include_anonymous": True}
            ]
        },
        "include_anonymous is for `rules:`; a query includes anonymous users by returning an "
        "anonymous_id column",
    ),
    "unknown combinator": (
        {"audiences": _one_rule({"every": [_BIG]})},
        "valid rules: all, any, not, performed, trait, in_audience",
    ),
}


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_rules_are_refused_at_apply_in_one_line_and_nothing_changes(
    case: str, tmp_path: Path, events: Engine, cli: None, state_url: str
) -> None:
    local = {"type": "file", "path": str(tmp_path / "identify.ndjson")}
    good = _config(tmp_path, events, local)
    assert invoke("apply", str(good)).exit_code == 0
    before = dump_database(state_url)

    change, expected = BAD_INPUTS[case]
    source = {"url": _url(events), **change["source"]} if "source" in change else None
    bad = _config(tmp_path, events, local, audiences=change["audiences"], source=source)
    result = invoke("apply", str(bad))
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert line.startswith(f"error: {bad} (line "), line
    assert expected in line, line
    assert dump_database(state_url) == before


def test_the_error_names_the_line_of_the_rule(
    tmp_path: Path, events: Engine, runtime: Runtime
) -> None:
    text = f"""\
sources:
  warehouse: {{url: "{_url(events)}", layout: segment}}
destinations:
  local: {{type: file, path: out.ndjson}}
audiences:
  - name: Repeat Buyers
    source: warehouse
    destinations: [local]
    rules:
      all:
        - trait: {{plan: {{eq: pro}}}}
        - performed: Order Completed
          where:
            revenue: {{gte: 50}}
            currency: {{eq: 5}}
"""
    path = tmp_path / "audiences.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        runtime.service.apply(load_config(path))
    assert str(raised.value).startswith(
        f"{path} (line 15): audiences[0] ('Repeat Buyers').rules.all[1].where.currency.eq: "
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_apply_stores_the_rules_and_the_layout(
    tmp_path: Path, events: Engine, runtime: Runtime, state_url: str
) -> None:
    local = {"type": "file", "path": str(tmp_path / "identify.ndjson")}
    source = {"url": _url(events), "layout": "segment", "identifies": "identifies"}
    apply_file(runtime, _config(tmp_path, events, local, source=source))
    engine = create_engine(state_url)
    try:
        with engine.connect() as connection:
            rules, query, anonymous = connection.execute(
                select(Audience.rules, Audience.query, Audience.include_anonymous).where(
                    Audience.key == KEY
                )
            ).one()
            layout = connection.scalar(select(Source.layout))
    finally:
        engine.dispose()
    assert (rules, query, anonymous) == (RULES, None, False)
    assert layout == {
        "layout": "segment",
        "schema": None,
        "tracks": "tracks",
        "identifies": "identifies",
        "users": "users",
    }
    # Applying the same file again changes nothing.
    report = runtime.service.apply(load_config(tmp_path / "audiences.yml"))
    assert report.unchanged == [KEY, "vip_list"] and not report.updated


def test_a_run_fails_cleanly_when_a_rule_no_longer_fits_the_tables(
    tmp_path: Path, events: Engine, runtime: Runtime, fake: FakeDestinations
) -> None:
    """A column dropped after `apply`: the run fails with the reason, nothing is sent."""
    apply_file(runtime, _config(tmp_path, events, ortto_destination(fake)))
    with events.begin() as connection:
        connection.exec_driver_sql("DROP TABLE page_viewed")
    [summary] = sync_all(runtime, audience_keys=[KEY])
    assert summary.status == "failed"
    assert "no table 'page_viewed'" in (summary.error or "")
    assert fake.items("ortto") == []
    assert sync_all(runtime, SyncRequest(is_dry_run=True), audience_keys=["vip_list"])


def test_the_rules_migration_goes_down_and_up_on_both_backends(
    tmp_path: Path, events: Engine, runtime: Runtime, state_url: str
) -> None:
    """0006 adds sources.layout, audiences.rules and include_anonymous, and lets a rule
    audience have no query; going down, a rule audience keeps a query that selects nobody."""
    local = {"type": "file", "path": str(tmp_path / "identify.ndjson")}
    apply_file(runtime, _config(tmp_path, events, local))
    runtime.engine.dispose()

    def columns(table: str) -> set[str]:
        engine = create_engine(state_url)
        names = {c["name"] for c in inspect(engine).get_columns(table)}
        engine.dispose()
        return names

    db.downgrade(state_url, "0003")
    assert "rules" not in columns("audiences") and "layout" not in columns("sources")
    engine = create_engine(state_url)
    with engine.connect() as connection:
        query = connection.exec_driver_sql(
            f"select query from audiences where key = '{KEY}'"
        ).scalar()
    engine.dispose()
    assert query == "select null as user_id where 1 = 0"
    db.upgrade(state_url)
    assert {"rules", "include_anonymous"} <= columns("audiences")
    assert "layout" in columns("sources")


def test_anonymous_visitors_are_members_with_include_anonymous(
    tmp_path: Path, events: Engine, runtime: Runtime
) -> None:
    """A visitor never identified is a member by anonymous id; an anonymous event that an
    identify call ties to a user counts for that user instead."""
    shop = _shop()
    shop.events["page_viewed"] += [
        {"id": "v8", "user_id": None, "anonymous_id": "visitor-8", "timestamp": _ago(1)}
        | {"path": "/pricing"},
        {"id": "v9", "user_id": None, "anonymous_id": "a2", "timestamp": _ago(1)}
        | {"path": "/pricing"},
    ]
    load(events, shop)
    audiences = [
        {
            "name": "Pricing Viewers",
            "source": "warehouse",
            "rules": {"performed": "Page Viewed", "where": {"path": {"eq": "/pricing"}}},
            "include_anonymous": True,
            "destinations": ["ortto"],  # the name _config gives its one destination
        }
    ]
    out = tmp_path / "identify.ndjson"
    local = {"type": "file", "path": str(out)}
    apply_file(runtime, _config(tmp_path, events, local, audiences=audiences))
    [summary] = sync_all(runtime)
    assert (summary.status, summary.members) == ("succeeded", 2)
    calls = read_calls(out)
    assert {(c.get("userId"), c.get("anonymousId")) for c in calls} == {
        (None, "visitor-8"),
        ("u2", None),
    }


def test_the_apply_plan_shows_a_rule_change_and_refuses_a_renamed_rule_audience(
    tmp_path: Path, events: Engine, runtime: Runtime
) -> None:
    local = {"type": "file", "path": str(tmp_path / "identify.ndjson")}
    apply_file(runtime, _config(tmp_path, events, local))
    narrower = {"all": [*RULES["all"][:2], {"trait": {"age": {"lt": 65}}}]}
    audiences = [
        {"name": "Repeat Buyers", "source": "warehouse", "rules": narrower}
        | {"destinations": ["ortto"], "include_anonymous": True},
        {"name": "VIP List", "source": "warehouse", "destinations": ["ortto"]}
        | {"query": "select id as user_id, email from users where age >= 60"},
    ]
    plan = runtime.service.plan(load_config(_config(tmp_path, events, local, audiences=audiences)))
    [item] = [i for i in plan.items if i.name == KEY]
    assert item.action == "change"
    assert {c.field: (c.before, c.after) for c in item.changes} == {
        "rules": (RULES, narrower),
        "include_anonymous": (False, True),
    }

    # The same rules under a new name (so a new key) while the old key is archived.
    renamed = [{"name": "Repeat Buyers 2", "source": "warehouse", "rules": RULES}]
    renamed[0]["destinations"] = ["ortto"]
    with pytest.raises(ConfigError, match="has the same source and rules: a likely rename"):
        runtime.service.apply(
            load_config(_config(tmp_path, events, local, audiences=[*renamed, audiences[1]]))
        )


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_rule_audience_takes_the_copy_path_with_its_values_bound_by_the_driver(
    tmp_path: Path, events: Engine
) -> None:
    """COPY takes no server-side parameters: the driver binds the compiled SELECT's values
    (quoted as literals), so a PostgreSQL source loads a rule audience COPY to COPY too."""
    layout = reflect_layout(events, LayoutSpec())
    query = compile_audience(
        parse_rules({"trait": {"plan": {"eq": SQL_LOOKING}}}),
        layout,
        now=datetime.now(UTC),
        audience="odd_plan",
    )
    try:
        statement = copy_statement(_url(events), query, timeout_seconds=30, source_name="warehouse")
        assert statement is not None and statement.startswith("COPY (SELECT")
        assert "'x'' OR ''1''=''1'" in statement  # the value as one quoted literal
        blocks = copy_rows(
            _url(events), statement, timeout_seconds=30, fetch_size=100, source_name="warehouse"
        )
        rows = b"".join(bytes(block.data) for block in blocks).splitlines()
    finally:
        dispose_source_engines()  # the warehouse database is dropped after the test
    assert [row.split(b"\t")[0] for row in rows] == [b"u7"]
