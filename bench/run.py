"""Benchmark: snapshot writes, the diff against a plain anti-join, delivery with and
without a rate limit, end-to-end syncs and peak memory, on the local PostgreSQL.

`python -m bench.run [--size 100000 --size 1000000]` prints a table and writes
bench/results.json. Each measurement runs in a child process of its own (so its peak RSS is
its own), against a fresh state and source database, delivering to the local fake
destination server running as another process. The bench checks its own results: every
change must arrive exactly once and the destination must end where the source says.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from worker import db
from worker.config import load_config
from worker.repositories import changes as change_repo
from worker.runtime import Runtime, build_runtime
from worker.service import PreparedRun, RunSummary, SyncRequest, SyncService
from worker.settings import Settings
from worker.testing.fake_destinations import (
    DEFAULT_ORTTO_API_KEY,
    DEFAULT_SEGMENT_WRITE_KEY,
    FakeDestinationsClient,
    spawn_fake_destinations,
)

RESULTS = Path(__file__).resolve().parent / "results.json"
DEFAULT_POSTGRES = os.environ.get(
    "AUDIENCE_SYNC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
STATE_DB, SOURCE_DB = "audience_sync_bench_state", "audience_sync_bench_source"
AUDIENCE_KEY = "bench_members"
RATE_PER_SECOND, PEOPLE_PER_REQUEST = 30, 100
TARGETS = {
    "diff_ratio_max": 1.5,
    "calls_per_second_min": 20_000,
    "rate_share_min": 0.95,
    "rss_ratio_max": 1.3,
}


# ----------------------------------------------------------------------------- databases


def _url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def _recreate(base: str, *names: str) -> None:
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for name in names:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()


def _fill_source(url: str, size: int) -> None:
    """`size` members plus 1% non-members who can enter later."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "create table people (user_id text primary key, email text, "
                "is_member boolean not null)"
            )
        )
        conn.execute(
            text(
                "insert into people select 'u' || lpad(i::text, 9, '0'), "
                "'user' || i || '@example.com', i <= :size "
                "from generate_series(1, :size + :size / 100) as i"
            ),
            {"size": size},
        )
    engine.dispose()


def _churn(url: str, size: int) -> tuple[set[str], set[str]]:
    """1% churn: 0.5% of members leave, as many non-members join. Returns (left, joined)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        left = set(
            conn.scalars(
                text(
                    "update people set is_member = false where is_member "
                    "and substr(user_id, 2)::int % 200 = 0 returning user_id"
                )
            )
        )
        joined = set(
            conn.scalars(
                text(
                    "update people set is_member = true where user_id in "
                    "(select user_id from people where not is_member "
                    "and substr(user_id, 2)::int > :size "
                    "order by user_id limit :n) returning user_id"
                ),
                {"size": size, "n": len(left)},
            )
        )
    engine.dispose()
    return left, joined


@contextmanager
def _runtime(
    base: str, directory: Path, destination: dict[str, Any], size: int
) -> Iterator[tuple[Runtime, int, str]]:
    _recreate(base, STATE_DB, SOURCE_DB)
    state, source = _url(base, STATE_DB), _url(base, SOURCE_DB)
    db.upgrade(state)
    _fill_source(source, size)
    config = directory / "audiences.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": {"shop": {"url": source}},
                "destinations": {"fake": destination},
                "audiences": [
                    {
                        "name": "Bench Members",
                        "source": "shop",
                        "query": "select user_id, email from people where is_member",
                        "destinations": ["fake"],
                    }
                ],
            }
        )
    )
    settings = Settings(database_url=state, snapshots_kept=3)
    runtime = build_runtime(settings)
    try:
        runtime.service.apply(load_config(config))
        [pair_id] = runtime.service.select_pairs()
        yield runtime, pair_id, source
    finally:
        runtime.close()


def _timed_sync(
    service: SyncService, pair_id: int, between: Callable[[PreparedRun], None] | None = None
) -> tuple[PreparedRun, RunSummary, dict[str, float]]:
    """One sync, timed by phase; `between` runs after the diff and is not counted."""
    started = time.perf_counter()
    prepared = service.start_run(pair_id, SyncRequest())
    assert isinstance(prepared, PreparedRun), prepared
    prepared_at = time.perf_counter()
    if between is not None:
        between(prepared)
    delivery_started = time.perf_counter()
    service.deliver_range(prepared, after=None, upto=None)
    delivered = time.perf_counter()
    summary = service.finish_run(prepared)
    assert summary.status == "succeeded", summary
    finished = time.perf_counter()
    return (
        prepared,
        summary,
        {
            "snapshot_seconds": prepared.snapshot_seconds,
            "diff_seconds": prepared.diff_seconds,
            "delivery_seconds": delivered - delivery_started,
            "end_to_end_seconds": (prepared_at - started) + (finished - delivery_started),
        },
    )


def _best_of(runs: int, action: Callable[[], float]) -> float:
    return min(action() for _ in range(runs))


def _diff_against_baseline(
    runtime: Runtime, prepared: PreparedRun, previous_snapshot: int
) -> dict[str, float]:
    """Our diff (the run's change set written to run_changes) next to a plain NOT EXISTS
    anti-join in both directions over tables of the same ids, writing its result too. Each
    is timed inside a transaction that is rolled back, best of three."""
    engine = runtime.engine
    with engine.begin() as conn:
        for table, snapshot in (
            ("bench_old", previous_snapshot),
            ("bench_new", prepared.snapshot_id),
        ):
            conn.execute(text(f"drop table if exists {table}"))
            conn.execute(text(f"create table {table} (id text primary key)"))
            conn.execute(
                text(
                    f"insert into {table} select member_id from snapshot_members "
                    "where snapshot_id = :s"
                ),
                {"s": snapshot},
            )
            conn.execute(text(f"analyze {table}"))

    def baseline() -> float:
        with engine.connect() as conn, conn.begin() as transaction:
            conn.execute(text("create temp table baseline_changes (id text, value boolean)"))
            started = time.perf_counter()
            conn.execute(
                text(
                    "insert into baseline_changes select n.id, true from bench_new n "
                    "where not exists (select 1 from bench_old o where o.id = n.id)"
                )
            )
            conn.execute(
                text(
                    "insert into baseline_changes select o.id, false from bench_old o "
                    "where not exists (select 1 from bench_new n where n.id = o.id)"
                )
            )
            elapsed = time.perf_counter() - started
            transaction.rollback()
        return elapsed

    def ours() -> float:
        with runtime.sessions() as session:
            change_repo.drop_changes(session, prepared.run_id)
            started = time.perf_counter()
            change_repo.plan_run_changes(session, prepared.scope, prepared.run_id)
            elapsed = time.perf_counter() - started
            session.rollback()
        return elapsed

    return {"baseline_seconds": _best_of(3, baseline), "diff_seconds": _best_of(3, ours)}


# ----------------------------------------------------------------------------- children


def child_size(base: str, fake_url: str, size: int) -> dict[str, Any]:
    """Initial sync, 1% churn, incremental sync, for one audience size. The destination's
    state is checked by the parent afterwards, so that check's memory is not counted here."""
    destination = {
        "type": "segment",
        "write_key": "${BENCH_WRITE_KEY}",
        "endpoint": fake_url,
        "rate_limit": "100000/s",
    }
    os.environ["BENCH_WRITE_KEY"] = DEFAULT_SEGMENT_WRITE_KEY
    with (
        tempfile.TemporaryDirectory() as directory,
        _runtime(base, Path(directory), destination, size) as (runtime, pair_id, source),
    ):
        first, initial, initial_times = _timed_sync(runtime.service, pair_id)
        left, joined = _churn(source, size)
        diff: dict[str, float] = {}

        def measure(prepared: PreparedRun) -> None:
            diff.update(_diff_against_baseline(runtime, prepared, first.snapshot_id))

        _, incremental, incremental_times = _timed_sync(runtime.service, pair_id, measure)
    return {
        "size": size,
        "snapshot_rows_per_second": size / initial_times["snapshot_seconds"],
        "diff_seconds": diff["diff_seconds"],
        "baseline_seconds": diff["baseline_seconds"],
        "diff_ratio": diff["diff_seconds"] / diff["baseline_seconds"],
        "diff_in_run_seconds": incremental_times["diff_seconds"],
        "calls_per_second": size / initial_times["delivery_seconds"],
        "initial_sync_seconds": initial_times["end_to_end_seconds"],
        "incremental_sync_seconds": incremental_times["end_to_end_seconds"],
        "incremental_changes": len(left) + len(joined),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sent": [initial.sent, incremental.sent],
        "left": sorted(left),
        "joined": sorted(joined),
    }


def _check_size(fake: FakeDestinationsClient, row: dict[str, Any]) -> bool:
    """Every change arrived exactly once and the destination ends where the source says."""
    state = fake.state()
    size, left, joined = row["size"], row.pop("left"), row.pop("joined")
    final = state["state"]["segment"][AUDIENCE_KEY]
    return bool(
        state["counts"]["segment"]["items"] == size + len(left) + len(joined)
        and row.pop("sent") == [size, len(left) + len(joined)]
        and all(final[u] is False for u in left)
        and all(final[u] is True for u in joined)
        and sum(final.values()) == size
    )


def child_rate_limited(base: str, fake_url: str, people: int) -> dict[str, Any]:
    """An initial sync to the Ortto REST API emulation at 30 requests/s x 100 people."""
    fake = FakeDestinationsClient(fake_url)
    fake.reset()
    fake.configure(max_requests_per_second=RATE_PER_SECOND)
    destination = {
        "type": "ortto-api",
        "api_key": "${BENCH_ORTTO_KEY}",
        "endpoint": fake_url,
        "rate_limit": f"{RATE_PER_SECOND}/s",
    }
    os.environ["BENCH_ORTTO_KEY"] = DEFAULT_ORTTO_API_KEY
    try:
        with (
            tempfile.TemporaryDirectory() as directory,
            _runtime(base, Path(directory), destination, people) as (runtime, pair_id, _source),
        ):
            _, summary, times = _timed_sync(runtime.service, pair_id)
            log = fake.log("ortto-api")
    finally:
        fake.configure(max_requests_per_second=None)
    allowed = RATE_PER_SECOND * PEOPLE_PER_REQUEST
    per_second = summary.sent / times["delivery_seconds"]
    return {
        "people": people,
        "people_per_second": per_second,
        "share_of_allowed": per_second / allowed,
        "responses_429": sum(1 for a in log["arrivals"] if a["status"] == 429),
        "exactly_once": summary.sent == people
        and len(fake.state()["state"]["ortto-api"].get(AUDIENCE_KEY, {})) == people,
    }


# ----------------------------------------------------------------------------- driver


def _run_child(args: list[str]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.run", *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"benchmark step {' '.join(args)} failed")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _table(results: dict[str, Any]) -> Table:
    table = Table(title=f"audience-sync benchmark ({results['machine']})")
    sizes = results["sizes"]
    table.add_column("measure")
    for row in sizes:
        table.add_column(f"{row['size']:,} members", justify="right")
    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        (
            "source read + snapshot write (rows/s)",
            lambda r: f"{r['snapshot_rows_per_second']:,.0f}",
        ),
        ("diff, 1% churn (s)", lambda r: f"{r['diff_seconds']:.3f}"),
        ("baseline NOT EXISTS anti-join (s)", lambda r: f"{r['baseline_seconds']:.3f}"),
        ("diff / baseline", lambda r: f"{r['diff_ratio']:.2f}x"),
        ("delivery, no rate limit (calls/s)", lambda r: f"{r['calls_per_second']:,.0f}"),
        ("initial sync end to end (s)", lambda r: f"{r['initial_sync_seconds']:.1f}"),
        ("incremental sync end to end (s)", lambda r: f"{r['incremental_sync_seconds']:.2f}"),
        ("peak RSS (MB)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("every change exactly once", lambda r: "yes" if r["exactly_once"] else "NO"),
    ]
    for label, cell in lines:
        table.add_row(label, *(cell(row) for row in sizes))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=int,
        action="append",
        help="audience size (repeat; default 100000 and 1000000)",
    )
    parser.add_argument(
        "--rate-people",
        type=int,
        default=30_000,
        help="people for the rate-limited delivery (default 30000)",
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--child", choices=["size", "rate"], help=argparse.SUPPRESS)
    parser.add_argument("--fake-url", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child == "size":
        print(json.dumps(child_size(args.postgres_url, args.fake_url, args.size[0])))
        return
    if args.child == "rate":
        print(json.dumps(child_rate_limited(args.postgres_url, args.fake_url, args.rate_people)))
        return

    console = Console()
    sizes = args.size or [100_000, 1_000_000]
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, PostgreSQL on localhost",
        "targets": TARGETS,
        "sizes": [],
    }
    common = ["--postgres-url", args.postgres_url]
    with spawn_fake_destinations() as fake:
        for size in sizes:
            console.print(f"measuring {size:,} members ...")
            fake.reset()
            row = _run_child(
                ["--child", "size", "--size", str(size), "--fake-url", fake.url, *common]
            )
            row["exactly_once"] = _check_size(fake, row)
            results["sizes"].append(row)
        console.print(f"measuring rate-limited delivery of {args.rate_people:,} people ...")
        results["rate_limited"] = _run_child(
            [
                "--child",
                "rate",
                "--rate-people",
                str(args.rate_people),
                "--fake-url",
                fake.url,
                *common,
            ]
        )
    rows = results["sizes"]
    if len(rows) >= 2:
        results["rss_ratio"] = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    _recreate(args.postgres_url, STATE_DB, SOURCE_DB)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    console.print(_table(results))
    rate = results["rate_limited"]
    console.print(
        f"rate-limited delivery ({RATE_PER_SECOND} requests/s x {PEOPLE_PER_REQUEST} people): "
        f"{rate['people_per_second']:,.0f} people/s = {rate['share_of_allowed']:.1%} of the "
        f"allowed {RATE_PER_SECOND * PEOPLE_PER_REQUEST:,}/s, {rate['responses_429']} responses "
        f"429, exactly once: {'yes' if rate['exactly_once'] else 'NO'}"
    )
    if "rss_ratio" in results:
        console.print(
            f"peak RSS {rows[-1]['size']:,} / {rows[0]['size']:,}: {results['rss_ratio']:.2f}x"
        )
    console.print(f"written to {args.output}")
    if not all(r["exactly_once"] for r in [*rows, rate]):
        raise SystemExit("a change was lost or delivered twice")


if __name__ == "__main__":
    main()
