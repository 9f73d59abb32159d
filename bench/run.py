"""Benchmark: end-to-end syncs next to the same work done raw in PostgreSQL, the diff next to
an anti-join, ingest, state size, memory, and delivery through a slow rate-limited
destination; each target of the performance issue checked and printed met / NOT met.

`python -m bench.run [--size 100000 --size 1000000]` prints the figures and the targets and
writes bench/results.json. For each size, in one run on one data set: an initial sync to a
local file (unlimited), then ten syncs at 1% churn, each `audience-sync sync` a process of
its own (timed from start to exit, its peak RSS its own), the raw baseline measured at the
same step; then the state database's size. Delivery is measured once, against the fake
destination server (another process) answering in 150 ms with a 30 requests/s limit. When
`bench/rules.py` is present, its rule-audience benchmark runs too.
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import (
    LATENCY_SECONDS,
    RATE_PER_SECOND,
    SOURCE_DB,
    STATE_DB,
    child_delivery,
    child_phases,
    measure_size,
    recreate,
    run_child,
)
from worker.testing.fake_destinations import spawn_fake_destinations

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
RULES_RESULTS = HERE / "rules_results.json"
DEFAULT_POSTGRES = os.environ.get(
    "AUDIENCE_SYNC_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# The measures: incremental sync / raw baseline at 1M members.
RATIO_SIZE, LARGE_SIZE = 1_000_000, 10_000_000


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    figure: float | None  # None: not measured in this run (a size missing)
    limit: float
    is_upper: bool  # the figure must be at most `limit` (else at least)
    unit: str

    @property
    def is_met(self) -> bool:
        assert self.figure is not None
        return self.figure <= self.limit if self.is_upper else self.figure >= self.limit

    def line(self) -> str:
        bound = f"{'<=' if self.is_upper else '>='} {self.limit:,g}{self.unit}"
        if self.figure is None:
            return f"{self.label}: not measured (size missing), target {bound}"
        verdict = "met" if self.is_met else "NOT met"
        return f"{self.label}: {self.figure:,.2f}{self.unit} (target {bound}): {verdict}"


def targets(results: dict[str, Any]) -> list[Target]:
    """The issue's table, checked against this run's figures."""
    rows = {row["size"]: row for row in results["sizes"]}
    ratio_row = rows.get(RATIO_SIZE) or rows[max(rows)]
    largest = rows[max(rows)]
    delivery = results["delivery"]
    rss_ratio = (
        rows[LARGE_SIZE]["peak_rss_mb"] / rows[RATIO_SIZE]["peak_rss_mb"]
        if LARGE_SIZE in rows and RATIO_SIZE in rows
        else None
    )
    return [
        Target(
            f"incremental sync end to end / raw baseline ({ratio_row['size']:,})",
            ratio_row["end_to_end_ratio"],
            2.5,
            True,
            "x",
        ),
        *(
            Target(
                f"diff statement / anti-join ({row['size']:,})", row["diff_ratio"], 1.5, True, "x"
            )
            for row in rows.values()
        ),
        Target(
            f"ingest from PostgreSQL ({largest['size']:,}), rows/s",
            largest["ingest_rows_per_second"],
            500_000,
            False,
            "",
        ),
        *(
            Target(
                f"state bytes per member after {1 + 10} runs ({row['size']:,})",
                row["state_bytes_per_member"],
                250,
                True,
                "",
            )
            for row in rows.values()
        ),
        Target(
            f"share of a {RATE_PER_SECOND}/s limit at {LATENCY_SECONDS * 1000:.0f} ms latency",
            delivery["share_of_limit"] * 100,
            90,
            False,
            "%",
        ),
        Target("429 answers at that latency and limit", delivery["responses_429"], 0, True, ""),
        Target("peak RSS, 10M vs 1M members", rss_ratio, 1.3, True, "x"),
        *(
            [
                Target(
                    "rule audience: compiled / hand-written SQL (bench/rules.py)",
                    float(rules["ratio"]),
                    float(rules["ratio_max"]),
                    True,
                    "x",
                )
            ]
            if isinstance(rules := results.get("rules"), dict) and "ratio" in rules
            else []
        ),
        Target(
            "10M members: incremental sync at 1% churn, s",
            rows[LARGE_SIZE]["incremental_sync_seconds"] if LARGE_SIZE in rows else None,
            60,
            True,
            "",
        ),
    ]


def _table(results: dict[str, Any]) -> Table:
    table = Table(title=f"audience-sync benchmark ({results['machine']})")
    sizes = results["sizes"]
    table.add_column("measure")
    for row in sizes:
        table.add_column(f"{row['size']:,} members", justify="right")
    lines: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("incremental sync, end to end (s)", lambda r: f"{r['incremental_sync_seconds']:.2f}"),
        ("raw baseline in PostgreSQL (s)", lambda r: f"{r['raw_baseline_seconds']:.2f}"),
        ("end to end / raw baseline", lambda r: f"{r['end_to_end_ratio']:.2f}x"),
        ("diff statement (s)", lambda r: f"{r['diff_seconds']:.3f}"),
        ("NOT EXISTS anti-join, both ways (s)", lambda r: f"{r['anti_join_seconds']:.3f}"),
        ("diff / anti-join", lambda r: f"{r['diff_ratio']:.2f}x"),
        ("ingest from PostgreSQL (rows/s)", lambda r: f"{r['ingest_rows_per_second']:,.0f}"),
        ("state bytes per member, after 11 runs", lambda r: f"{r['state_bytes_per_member']:,.0f}"),
        ("initial sync, end to end (s)", lambda r: f"{r['initial_sync_seconds']:.1f}"),
        ("peak RSS of a sync process (MB)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("every change exactly once", lambda r: "yes" if r["exactly_once"] else "NO"),
    ]
    for label, cell in lines:
        table.add_row(label, *(cell(row) for row in sizes))
    return table


def _rules_bench(console: Console) -> dict[str, Any] | None:
    """The rule-audience benchmark (bench/rules.py), when it is there, in its own process;
    its figures, as it wrote them."""
    if importlib.util.find_spec("bench.rules") is None:
        return None
    console.print("measuring rule audiences (bench/rules.py) ...")
    completed = subprocess.run([sys.executable, "-m", "bench.rules"], check=False)
    if completed.returncode != 0 or not RULES_RESULTS.exists():
        return {"exit_status": completed.returncode}
    rules: dict[str, Any] = json.loads(RULES_RESULTS.read_text())
    return rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=int,
        action="append",
        help="audience size (repeat; default 100000 and 1000000)",
    )
    parser.add_argument(
        "--delivery-people",
        type=int,
        default=60_000,
        help="people sent through the slow destination (default 60000)",
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES)
    parser.add_argument("--skip-rules", action="store_true", help="skip bench/rules.py")
    parser.add_argument("--child", choices=["phases", "delivery"], help=argparse.SUPPRESS)
    parser.add_argument("--fake-url", help=argparse.SUPPRESS)
    parser.add_argument("--state-url", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child == "phases":
        print(json.dumps(child_phases(args.state_url)))
        return
    if args.child == "delivery":
        print(json.dumps(child_delivery(args.postgres_url, args.fake_url, args.delivery_people)))
        return

    console = Console()
    sizes = sorted(args.size or [100_000, 1_000_000])
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, PostgreSQL on localhost",
        "sizes": [],
    }
    console.print(
        f"measuring delivery of {args.delivery_people:,} people at "
        f"{LATENCY_SECONDS * 1000:.0f} ms latency, {RATE_PER_SECOND} requests/s ..."
    )
    with spawn_fake_destinations() as fake:
        results["delivery"] = run_child(
            [
                "--child",
                "delivery",
                "--delivery-people",
                str(args.delivery_people),
                "--fake-url",
                fake.url,
                "--postgres-url",
                args.postgres_url,
            ]
        )
    if not args.skip_rules:
        results["rules"] = _rules_bench(console)
    checked: list[Target] = []
    for size in sizes:
        console.print(f"measuring {size:,} members ...")
        row = measure_size(args.postgres_url, size, console.print)
        results["sizes"].append(row)
        console.print(
            f"  {size:,}: incremental {row['incremental_sync_seconds']:.2f} s, raw "
            f"{row['raw_baseline_seconds']:.2f} s ({row['end_to_end_ratio']:.2f}x), initial "
            f"{row['initial_sync_seconds']:.1f} s, {row['state_bytes_per_member']:,.0f} bytes "
            f"per member, peak RSS {row['peak_rss_mb']:.0f} MB",
            markup=False,
        )
        # Written after each size: a long run stopped early keeps what it measured.
        checked = targets(results)
        results["targets"] = [
            {"target": t.label, "figure": t.figure, "limit": t.limit, "is_upper": t.is_upper}
            | ({} if t.figure is None else {"is_met": t.is_met})
            for t in checked
        ]
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    recreate(args.postgres_url, STATE_DB, SOURCE_DB)

    console.print(_table(results))
    delivery = results["delivery"]
    console.print(
        f"delivery at {LATENCY_SECONDS * 1000:.0f} ms latency, {RATE_PER_SECOND} requests/s "
        f"limit: {delivery['requests_per_second']:.1f} requests/s = "
        f"{delivery['share_of_limit']:.1%} of the limit, at most "
        f"{delivery['most_in_one_second']} in one second, {delivery['responses_429']} answers "
        f"429, exactly once: {'yes' if delivery['exactly_once'] else 'NO'}"
    )
    console.print("targets:")
    for target in checked:
        console.print(f"  {target.line()}", markup=False)
    console.print(f"written to {args.output}")
    if not all(r["exactly_once"] for r in [*results["sizes"], delivery]):
        raise SystemExit("a change was lost or delivered twice")


if __name__ == "__main__":
    main()
