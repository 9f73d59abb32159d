"""`audience-sync demo`: a sample shop on SQLite, three audiences, two syncs to a file."""

import json
import random
import sqlite3
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from worker import db, render
from worker.config import load_config
from worker.domain import RunSummary, SyncRequest
from worker.runtime import build_runtime
from worker.settings import Settings

USERS = 2_000

AUDIENCES_YML = """\
# The demo's audiences: SQL over the sample shop, synced to an NDJSON file.
sources:
  shop: {{url: "sqlite:///{shop}"}}
destinations:
  local: {{type: file, path: "{out}"}}
audiences:
  - name: Order Completed Last 30days
    source: shop
    query: >
      select u.id as user_id, u.email from users u
      where exists (select 1 from orders o where o.user_id = u.id
                    and o.created_at >= datetime('now', '-30 days'))
    schedule: every 2h
    destinations: [local]
  - name: High-Value Customers
    source: shop
    query: >
      select u.id as user_id, u.email from users u join orders o on o.user_id = u.id
      group by u.id, u.email having sum(o.amount) >= 500
    schedule: every 6h
    destinations: [local]
  - name: Newsletter Subscribers
    source: shop
    query: select id as user_id, email from users where newsletter = 1
    schedule: every 2h
    destinations: [local]
"""


def build_shop(path: Path, *, seed: int = 7) -> None:
    """A small shop: users with emails and a newsletter flag, and their orders."""
    rng = random.Random(seed)
    path.unlink(missing_ok=True)
    now = datetime.now(UTC).replace(tzinfo=None)
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "create table users (id text primary key, email text, newsletter integer);"
            "create table orders (id integer primary key, user_id text, amount real,"
            " created_at text);"
        )
        conn.executemany(
            "insert into users values (?, ?, ?)",
            [(f"u{i:05d}", f"user{i}@example.com", int(rng.random() < 0.4)) for i in range(USERS)],
        )
        orders = []
        for i in range(USERS):
            for _ in range(rng.randint(0, 4)):
                when = now - timedelta(days=rng.randint(0, 90))
                orders.append((f"u{i:05d}", round(rng.uniform(10, 300), 2), when.isoformat(" ")))
        conn.executemany(
            "insert into orders (user_id, amount, created_at) values (?, ?, ?)", orders
        )


def churn_shop(path: Path, *, seed: int = 11) -> None:
    """Some users order today, some old orders age out, some unsubscribe."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(tzinfo=None)
    with sqlite3.connect(path) as conn:
        buyers = rng.sample(range(USERS), 60)
        conn.executemany(
            "insert into orders (user_id, amount, created_at) values (?, ?, ?)",
            [(f"u{i:05d}", 450.0, now.isoformat(" ")) for i in buyers],
        )
        aged = rng.sample(range(USERS), 80)
        conn.executemany(
            "update orders set created_at = ? where user_id = ?",
            [((now - timedelta(days=120)).isoformat(" "), f"u{i:05d}") for i in aged],
        )
        conn.executemany(
            "update users set newsletter = 1 - newsletter where id = ?",
            [(f"u{i:05d}",) for i in rng.sample(range(USERS), 40)],
        )


def run_demo(directory: Path, console: Console) -> list[RunSummary]:
    directory.mkdir(parents=True, exist_ok=True)
    shop, out, state = directory / "shop.db", directory / "identify.ndjson", directory / "state.db"
    for stale in (out, state):
        stale.unlink(missing_ok=True)
    build_shop(shop)
    config_file = directory / "audiences.yml"
    config_file.write_text(AUDIENCES_YML.format(shop=shop.resolve(), out=out.resolve()))
    settings = Settings(database_url=f"sqlite:///{state.resolve()}")
    db.upgrade(settings.database_url)
    runtime = build_runtime(settings)
    try:
        service = runtime.service
        report = service.apply(load_config(config_file))
        console.print(f"applied {config_file}: created {', '.join(report.created)}")
        summaries = []
        for label, prepare in (("initial sync", None), ("after churn", churn_shop)):
            if prepare is not None:
                prepare(shop)
                console.print("changed some orders and newsletter subscriptions")
            before = _count_lines(out)
            runs = [service.sync_pair(p, SyncRequest()) for p in service.select_pairs()]
            summaries += runs
            console.print(f"{label}: {_count_lines(out) - before} identify calls written to {out}")
        _print(console, summaries, out)
    finally:
        runtime.close()
    console.print(
        f"state database: {state}; try `AUDIENCE_SYNC_DATABASE_URL=sqlite:///{state} "
        "audience-sync history`"
    )
    return summaries


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _print(console: Console, summaries: list[RunSummary], out: Path) -> None:
    console.print(render.demo_table(summaries))
    values: Counter[str] = Counter()
    with out.open(encoding="utf-8") as handle:
        for line in handle:
            traits = json.loads(line)["traits"]
            for key, value in traits.items():
                if key != "email":
                    values[f"{key}: {str(value).lower()}"] += 1
    console.print(
        "identify calls by trait: " + ", ".join(f"{k} x{v}" for k, v in sorted(values.items()))
    )
