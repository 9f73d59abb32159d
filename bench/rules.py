"""Benchmark of rule audiences: a compiled rule next to hand-written SQL of the same meaning.

`python -m bench.rules [--events 10000000 --users 1000000]` builds a Segment-layout warehouse
in a fresh PostgreSQL database of its own (dropped afterwards): `users` with traits,
`identifies` tying anonymous ids to users (some anonymous ids re-identified by a later user),
per-event tables and `tracks`, with anonymous events and events no one ever identified. The
rows are generated inside PostgreSQL (`generate_series`), then the indexes the layout needs
(see the README, "Rule audiences") are created and the tables analyzed.

It then times, on the same data in the same run, the compiled query of "Repeat Buyers 30d"
and a hand-written query of the same meaning: each runs in full (`select count(*)` over
it), once to warm up, then best of three, the two taking turns. Both must return the same
members. The figures are printed and written to bench/rules_results.json; the target is a
ratio of at most 1.5.

The admin connection is AUDIENCE_SYNC_BENCH_POSTGRES_URL (default: the local server's `test`
database); the warehouse database is created next to it.
"""

import argparse
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, Select, column, create_engine, func, select, text

from worker.rules import compile_audience, parse_layout_spec, parse_rules, reflect_layout
from worker.testing.databases import scratch_database

RESULTS = Path(__file__).resolve().parent / "rules_results.json"
ADMIN_URL = os.environ.get(
    "AUDIENCE_SYNC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
RATIO_MAX = 1.5
RUNS = 3
# A fixed "now": the generated events lie in the year before it, so every run sees the same data.
NOW = datetime(2026, 11, 1, tzinfo=UTC)
WINDOW = timedelta(days=30)

AUDIENCE = "Repeat Buyers 30d"
RULES_YAML = """
all:
  - performed: Order Completed
    where: {revenue: {gte: 50}}
    count: {at_least: 2}
    within: 30d
  - trait: {plan: {eq: pro}}
  - not: {performed: Order Refunded, within: 30d}
"""

# How a data engineer writes the same audience by hand: each anonymous event in the window
# looks up its user in `identifies` (the latest row for that anonymous id, as the rules
# stitch), buyers are counted per user, refunders excluded with NOT EXISTS.
HAND_WRITTEN = """
with buyers as (
    select coalesce(o.user_id, s.user_id) as user_id
    from order_completed o
    left join lateral (
        select i.user_id
        from identifies i
        where o.user_id is null and i.anonymous_id = o.anonymous_id and i.user_id is not null
        order by i.timestamp desc nulls last, i.user_id desc
        limit 1
    ) s on true
    where o.timestamp >= :window_start and o.timestamp <= :now and o.revenue >= 50
    group by 1
    having count(*) >= 2
),
refunders as (
    select coalesce(r.user_id, s.user_id) as user_id
    from order_refunded r
    left join lateral (
        select i.user_id
        from identifies i
        where r.user_id is null and i.anonymous_id = r.anonymous_id and i.user_id is not null
        order by i.timestamp desc nulls last, i.user_id desc
        limit 1
    ) s on true
    where r.timestamp >= :window_start and r.timestamp <= :now
)
select u.id as user_id, u.email
from users u
join buyers b on b.user_id = u.id
where u.plan = 'pro'
  and not exists (select 1 from refunders f where f.user_id = u.id)
"""

# Shares of the events: most are page views, a fifth are orders, a few are refunds.
EVENT_SHARES = {"page_viewed": 0.78, "order_completed": 0.2, "order_refunded": 0.02}

# Who performs event number g: users drawn with a skew (a few buy often, most rarely), 15% of
# the events sent before login (anonymous id only, stitched by identifies), 2% from visitors
# no one ever identified.
_PERSON = """
    with drawn as (
        select g, random() as r, 1 + floor(:users * power(random(), 2))::bigint as u,
               :now_ts - random() * interval '365 days' as ts
        from generate_series(1, :rows) as g
    )
    select :prefix || g as id,
           case when r < 0.15 then null when r < 0.17 then null else 'u' || u end as user_id,
           case when r < 0.17 and r >= 0.15 then 'x' || (g % 200000)
                when r < 0.03 and u % 5 = 0 then 'b' || u
                else 'a' || u end as anonymous_id,
           ts as timestamp, r
    from drawn
"""

GENERATE = [
    "select setseed(0.42)",
    """create table users (
        id text primary key, email text, plan text, first_name text, lifetime_value double
        precision, created_at timestamptz)""",
    """insert into users
       select 'u' || i, 'user' || i || '@example.com',
              case when random() < 0.25 then 'pro' when random() < 0.5 then 'team' else 'free' end,
              'Name ' || i, round((random() * 2000)::numeric, 2),
              :now_ts - random() * interval '900 days'
       from generate_series(1, :users) as i""",
    """create table identifies (
        id text primary key, anonymous_id text, user_id text, timestamp timestamptz, email text,
        plan text)""",
    # Every user's first device; every fifth user a second one; every fiftieth device later
    # identified by the next user too (a shared device: the latest identify wins).
    """insert into identifies
       select 'i' || i, 'a' || i, 'u' || i, :now_ts - interval '400 days' + random() * interval
              '30 days', 'user' || i || '@example.com', null
       from generate_series(1, :users) as i
       union all
       select 'j' || i, 'b' || i, 'u' || i, :now_ts - random() * interval '365 days', null, null
       from generate_series(5, :users, 5) as i
       union all
       select 'k' || i, 'a' || i, 'u' || (i + 1), :now_ts - random() * interval '200 days',
              null, null
       from generate_series(50, :users, 50) as i""",
    """create table page_viewed (
        id text primary key, anonymous_id text, user_id text, timestamp timestamptz, path text,
        title text)""",
    f"""insert into page_viewed
        select id, anonymous_id, user_id, timestamp, '/page/' || (floor(r * 1000))::int,
               'Page'
        from ({_PERSON.replace(":prefix", "'p'").replace(":rows", ":page_viewed")}) as e""",
    """create table order_completed (
        id text primary key, anonymous_id text, user_id text, timestamp timestamptz,
        order_id text, revenue double precision, currency text)""",
    f"""insert into order_completed
        select id, anonymous_id, user_id, timestamp, 'o' || id,
               round((random() * 200)::numeric, 2),
               case when random() < 0.7 then 'EUR' else 'USD' end
        from ({_PERSON.replace(":prefix", "'c'").replace(":rows", ":order_completed")}) as e""",
    """create table order_refunded (
        id text primary key, anonymous_id text, user_id text, timestamp timestamptz,
        order_id text, revenue double precision)""",
    f"""insert into order_refunded
        select id, anonymous_id, user_id, timestamp, 'o' || id, round((random() * 200)::numeric, 2)
        from ({_PERSON.replace(":prefix", "'r'").replace(":rows", ":order_refunded")}) as e""",
    """create table tracks (
        id text primary key, anonymous_id text, user_id text, timestamp timestamptz, event text,
        event_text text)""",
    """insert into tracks
       select id, anonymous_id, user_id, timestamp, 'page_viewed', 'Page Viewed' from page_viewed
       union all
       select id, anonymous_id, user_id, timestamp, 'order_completed', 'Order Completed'
       from order_completed
       union all
       select id, anonymous_id, user_id, timestamp, 'order_refunded', 'Order Refunded'
       from order_refunded""",
]

# The indexes the layout needs (the README's "Rule audiences" lists them): each event
# table's timestamp for windows, identifies' anonymous id for stitching; the users table's
# primary key is its index on id.
INDEXES = [
    *(f"create index on {events} (timestamp)" for events in EVENT_SHARES),
    "create index on identifies (anonymous_id, timestamp)",
]


@contextmanager
def _warehouse(admin_url: str) -> Iterator[Engine]:
    """A fresh database next to the admin connection's, dropped afterwards."""
    with scratch_database(admin_url, prefix="audience_sync_bench_rules") as url:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            yield engine
        finally:
            engine.dispose()


def _generate(engine: Engine, users: int, events: int) -> dict[str, float]:
    """Fill the warehouse; the seconds spent generating rows and building indexes."""
    counts = {name: round(events * share) for name, share in EVENT_SHARES.items()}
    parameters = {"users": users, "now_ts": NOW, **counts}
    started = time.perf_counter()
    with engine.connect() as connection:
        for statement in GENERATE:
            used = {k: v for k, v in parameters.items() if f":{k}" in statement}
            connection.execute(text(statement), used)
        generated = time.perf_counter()
        for statement in INDEXES:
            connection.execute(text(statement))
        for name in ("users", "identifies", "tracks", *EVENT_SHARES):
            connection.execute(text(f"vacuum analyze {name}"))
    indexed = time.perf_counter()
    return {"rows_seconds": generated - started, "indexes_seconds": indexed - generated}


def _compiled(engine: Engine) -> Select[Any]:
    rule = parse_rules(yaml.safe_load(RULES_YAML))
    layout = reflect_layout(engine, parse_layout_spec({"layout": "segment"}))
    return compile_audience(rule, layout, now=NOW, audience="repeat_buyers_30d")


def _hand_written() -> Any:
    query = text(HAND_WRITTEN).bindparams(window_start=NOW - WINDOW, now=NOW)
    return query.columns(column("user_id"), column("email"))


def _timed(engine: Engine, query: Any) -> tuple[float, int]:
    """Seconds to run `query` in full (counting its rows), and that count."""
    counted = select(func.count()).select_from(query.subquery())
    with engine.connect() as connection:
        started = time.perf_counter()
        rows = connection.execute(counted).scalar_one()
        return time.perf_counter() - started, rows


def _best(engine: Engine, queries: dict[str, Any]) -> dict[str, tuple[float, list[float], int]]:
    """Per query: the best of RUNS timings, all of them and the row count. The queries take
    turns (one run of each per round), so a busy machine slows both alike."""
    for query in queries.values():
        _timed(engine, query)  # warm-up: caches and statistics, not measured
    times: dict[str, list[float]] = {name: [] for name in queries}
    counts: dict[str, set[int]] = {name: set() for name in queries}
    for _ in range(RUNS):
        for name, query in queries.items():
            seconds, rows = _timed(engine, query)
            times[name].append(seconds)
            counts[name].add(rows)
    for name, found in counts.items():
        if len(found) != 1:
            raise AssertionError(f"the {name} query returned different counts: {found}")
    return {name: (min(times[name]), times[name], counts[name].pop()) for name in queries}


def _members(engine: Engine, query: Any) -> set[str]:
    with engine.connect() as connection:
        return {row.user_id for row in connection.execute(query)}


def run(users: int, events: int, admin_url: str = ADMIN_URL) -> dict[str, Any]:
    """Build the warehouse, time both queries and check they agree; the results."""
    with _warehouse(admin_url) as engine:
        generation = _generate(engine, users, events)
        compiled, hand_written = _compiled(engine), _hand_written()
        compiled_members = _members(engine, compiled)
        hand_members = _members(engine, hand_written)
        if compiled_members != hand_members:
            raise AssertionError(
                f"the compiled query returned {len(compiled_members)} members, the hand-written "
                f"one {len(hand_members)}; {len(compiled_members ^ hand_members)} differ"
            )
        timings = _best(engine, {"compiled": compiled, "hand-written": hand_written})
        compiled_best, compiled_times, compiled_rows = timings["compiled"]
        hand_best, hand_times, hand_rows = timings["hand-written"]
        with engine.connect() as connection:
            version = connection.execute(text("show server_version")).scalar_one()
    ratio = compiled_best / hand_best
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
        f"Python {platform.python_version()}, PostgreSQL {version} on localhost",
        "audience": AUDIENCE,
        "rules": yaml.safe_load(RULES_YAML),
        "users": users,
        "events": events,
        "generation_seconds": round(generation["rows_seconds"], 1),
        "indexes_seconds": round(generation["indexes_seconds"], 1),
        "members": len(compiled_members),
        "compiled_seconds": round(compiled_best, 4),
        "compiled_runs": [round(t, 4) for t in compiled_times],
        "hand_written_seconds": round(hand_best, 4),
        "hand_written_runs": [round(t, 4) for t in hand_times],
        "rows_counted": {"compiled": compiled_rows, "hand_written": hand_rows},
        "ratio": round(ratio, 3),
        "ratio_max": RATIO_MAX,
        "met": ratio <= RATIO_MAX,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    if arguments.events < 1 or arguments.users < 50:
        parser.error("--events must be at least 1 and --users at least 50")
    results = run(arguments.users, arguments.events)
    print(
        f"{results['audience']}: {results['users']:,} users, {results['events']:,} events "
        f"(generated in {results['generation_seconds']}s, indexed in "
        f"{results['indexes_seconds']}s), {results['members']:,} members\n"
        f"  compiled rules   {results['compiled_seconds']:.3f}s\n"
        f"  hand-written SQL {results['hand_written_seconds']:.3f}s\n"
        f"  ratio {results['ratio']:.2f} (target <= {RATIO_MAX}): "
        f"{'met' if results['met'] else 'NOT met'}"
    )
    arguments.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
