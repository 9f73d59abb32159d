"""The `audience-sync` command line: thin commands that call the service."""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from worker import db
from worker.config import load_config
from worker.domain import RunStatus, Trigger
from worker.errors import AudienceSyncError
from worker.repositories import audiences as audience_repo
from worker.repositories import failures as failure_repo
from worker.repositories import runs as run_repo
from worker.runtime import Runtime, build_runtime
from worker.service import NoProgress, Progress, RunSummary, SyncRequest
from worker.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="State database schema.")
audiences_app = typer.Typer(no_args_is_help=True, help="Audiences in the state database.")
runs_app = typer.Typer(no_args_is_help=True, help="Sync runs.")
destinations_app = typer.Typer(no_args_is_help=True, help="Destinations.")
app.add_typer(db_app, name="db")
app.add_typer(audiences_app, name="audiences")
app.add_typer(runs_app, name="runs")
app.add_typer(destinations_app, name="destinations")

console = Console()
err_console = Console(stderr=True)
BAD_STATUSES = {RunStatus.FAILED, RunStatus.BLOCKED, RunStatus.PARTIAL}


class _BarProgress:
    """A progress bar on a terminal, for long runs."""

    def __init__(self) -> None:
        self._bar = RichProgress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        self._bar.advance(self._task, amount)

    def stop(self) -> None:
        self._bar.stop()


def _progress_factory() -> Progress:
    return _BarProgress() if err_console.is_terminal else NoProgress()


@contextmanager
def _runtime(settings: Settings | None = None) -> Iterator[Runtime]:
    runtime = build_runtime(settings or get_settings(), progress=_progress_factory)
    try:
        yield runtime
    finally:
        runtime.close()


def _fail(message: str, code: int = 2) -> None:
    # soft_wrap: one line whatever the terminal's width, so it can be grepped and logged.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """One clear line and exit status 2 for anything the user can fix."""
    try:
        yield
    except AudienceSyncError as exc:
        _fail(str(exc))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the state database schema."""
    settings = get_settings()
    db.upgrade(settings.database_url)
    console.print("state database is up to date")


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="The audiences YAML file.")],
    check_queries: Annotated[
        bool, typer.Option(help="Run each query once (no rows) to refuse broken ones.")
    ] = True,
) -> None:
    """Create or update sources, destinations and audiences from FILE (all or nothing)."""
    with _errors(), _runtime() as runtime:
        config = load_config(file)
        report = runtime.service.apply(config, check_queries=check_queries)
    for label, keys in (
        ("created", report.created),
        ("updated", report.updated),
        ("archived", report.archived),
        ("unchanged", report.unchanged),
    ):
        if keys:
            console.print(f"{label}: {', '.join(keys)}")


@audiences_app.command("list")
def audiences_list() -> None:
    """List audiences with their keys, sources, schedules and destinations."""
    with _errors(), _runtime() as runtime, runtime.sessions() as session:
        table = Table("key", "name", "source", "schedule", "destinations", "archived")
        names = {d.id: d.name for d in audience_repo.destinations_by_name(session).values()}
        for audience in audience_repo.all_audiences(session):
            table.add_row(
                audience.key,
                audience.name,
                audience.source.name,
                audience.schedule,
                ", ".join(names[link.destination_id] for link in audience.links if link.is_enabled),
                "yes" if audience.is_archived else "",
            )
    console.print(table)


@app.command()
def sync(
    keys: Annotated[list[str] | None, typer.Argument(help="Audience keys (default: all).")] = None,
    all_audiences: Annotated[
        bool, typer.Option("--all", help="Sync every active audience.")
    ] = False,
    destination: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Re-send every member's value.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count changes, send nothing.")
    ] = False,
    allow_mass_exit: Annotated[
        bool, typer.Option("--allow-mass-exit", help="Let a run past the mass-exit guard.")
    ] = False,
    retry_quarantined: Annotated[
        bool, typer.Option("--retry-quarantined", help="Try quarantined users again.")
    ] = False,
    enqueue: Annotated[
        bool, typer.Option("--enqueue", help="Queue the sync for the Celery workers.")
    ] = False,
) -> None:
    """Sync audiences now (in this process, or queued with --enqueue)."""
    if keys and all_audiences:
        _fail("give audience keys or --all, not both")
    request = SyncRequest(
        is_full=full,
        is_dry_run=dry_run,
        allow_mass_exit=allow_mass_exit,
        retry_quarantined=retry_quarantined,
        trigger=Trigger.MANUAL,
    )
    with _errors(), _runtime() as runtime:
        pair_ids = runtime.service.select_pairs(
            audience_keys=keys or [], destination_name=destination
        )
        if not pair_ids:
            _fail("nothing to sync: no active audience with an enabled destination matches")
        if enqueue:
            from worker.tasks import enqueue_sync

            for pair_id in pair_ids:
                console.print(f"queued task {enqueue_sync(pair_id, request)} (pair {pair_id})")
            return
        summaries = [runtime.service.sync_pair(pair_id, request) for pair_id in pair_ids]
    _print_summaries(summaries)
    if any(s.status in BAD_STATUSES for s in summaries):
        raise typer.Exit(1)


def _print_summaries(summaries: list[RunSummary]) -> None:
    table = Table(
        "run",
        "audience",
        "destination",
        "mode",
        "status",
        "members",
        "entered",
        "exited",
        "sent",
        "failed",
        "seconds",
        "error",
    )
    for s in summaries:
        table.add_row(
            str(s.run_id),
            s.audience_key,
            s.destination,
            s.mode,
            _status(s.status),
            str(s.members),
            str(s.entered),
            str(s.exited),
            str(s.sent),
            str(s.failed),
            f"{s.duration_seconds:.2f}",
            s.error or "",
        )
    console.print(table)


def _status(status: str) -> str:
    colour = {
        "succeeded": "green",
        "partial": "yellow",
        "failed": "red",
        "blocked": "red",
        "skipped": "dim",
        "running": "cyan",
    }.get(status, "white")
    return f"[{colour}]{status}[/]"


@app.command()
def history(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show the sync history."""
    with _errors(), _runtime() as runtime, runtime.sessions() as session:
        rows = run_repo.history(session, audience_key=audience, limit=limit)
        records = [_run_record(run, key, name) for run, key, name in rows]
    if as_json:
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
        return
    table = Table(
        "run",
        "audience",
        "destination",
        "mode",
        "trigger",
        "status",
        "started",
        "members",
        "entered",
        "exited",
        "sent",
        "failed",
        "error",
    )
    for r in records:
        table.add_row(
            str(r["id"]),
            r["audience"],
            r["destination"],
            r["mode"],
            r["trigger"],
            _status(r["status"]),
            r["started_at"][:19],
            str(r["members"]),
            str(r["entered"]),
            str(r["exited"]),
            str(r["sent"]),
            str(r["failed"]),
            r["error"] or "",
        )
    console.print(table)


def _run_record(run: Any, key: str, destination: str) -> dict[str, Any]:
    return {
        "id": run.id,
        "audience": key,
        "destination": destination,
        "mode": run.mode,
        "trigger": run.trigger,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "members": run.members,
        "entered": run.entered,
        "exited": run.exited,
        "sent": run.sent,
        "failed": run.failed,
        "skipped_rows": run.skipped_rows,
        "error": run.error,
    }


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run id (see `history`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one run with its skipped rows and per-user failures."""
    with _errors(), _runtime() as runtime, runtime.sessions() as session:
        run = run_repo.get_run(session, run_id)
        if run is None:
            _fail(f"no run {run_id}")
        assert run is not None
        pair_names = audience_repo.names_of_pair(session, run.audience_id, run.destination_id)
        record = _run_record(run, *pair_names)
        record["failures"] = [
            {"user": f.member_id, "value": f.value, "status": f.status, "message": f.message}
            for f in failure_repo.failures_of_run(session, run_id)
        ]
    if as_json:
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
        return
    for name in (
        "id",
        "audience",
        "destination",
        "mode",
        "trigger",
        "status",
        "started_at",
        "finished_at",
        "members",
        "entered",
        "exited",
        "sent",
        "failed",
        "error",
    ):
        console.print(f"[bold]{name}:[/] {record[name]}", highlight=False)
    skipped = record["skipped_rows"] or {}
    console.print(
        "[bold]skipped_rows:[/] "
        + (", ".join(f"{reason}={count}" for reason, count in skipped.items()) or "none"),
        highlight=False,
    )
    if record["failures"]:
        table = Table("user", "value", "status", "message", title="per-user failures")
        for f in record["failures"]:
            table.add_row(f["user"], str(f["value"]).lower(), str(f["status"] or ""), f["message"])
        console.print(table)


@app.command()
def failures(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    all_failing: Annotated[
        bool, typer.Option("--all", help="Also users not (yet) quarantined.")
    ] = False,
) -> None:
    """List quarantined users (rejected too many times in a row)."""
    with _errors(), _runtime() as runtime, runtime.sessions() as session:
        rows = failure_repo.failing_members(
            session, audience_key=audience, only_quarantined=not all_failing
        )
        table = Table(
            "audience",
            "destination",
            "user",
            "value",
            "rejections",
            "quarantined",
            "status",
            "message",
            "last run",
        )
        for member, key, name in rows:
            table.add_row(
                key,
                name,
                member.member_id,
                str(member.last_value).lower(),
                str(member.consecutive_failures),
                "yes" if member.is_quarantined else "",
                str(member.last_status or ""),
                member.last_message,
                str(member.last_run_id),
            )
    console.print(table if rows else "no quarantined users")


@app.command()
def archive(
    key: Annotated[str, typer.Argument(help="The audience key.")],
    exit_members: Annotated[
        bool, typer.Option("--exit-members", help="First send false to every member.")
    ] = False,
) -> None:
    """Archive an audience (no more syncs; history kept)."""
    with _errors(), _runtime() as runtime:
        summaries = runtime.service.archive(key, exit_members=exit_members)
    if summaries:
        _print_summaries(summaries)
    if any(s.status != RunStatus.SUCCEEDED for s in summaries):
        _fail(f"audience {key!r} stays active: not every destination took the exits", 1)
    console.print(f"archived {key}")


@app.command()
def status() -> None:
    """Per audience and destination: last run, its status, next due time, running or not."""
    with _errors(), _runtime() as runtime:
        rows = runtime.service.status()
    table = Table(
        "audience",
        "destination",
        "schedule",
        "last run",
        "status",
        "started",
        "next due",
        "running",
    )
    for row in rows:
        table.add_row(
            row.audience_key,
            row.destination,
            row.schedule,
            str(row.last_run_id or ""),
            _status(row.last_status) if row.last_status else "never",
            row.last_started_at.isoformat()[:19] if row.last_started_at else "",
            row.next_due_at.isoformat()[:19],
            "yes" if row.is_running else "",
        )
    console.print(table)


@destinations_app.command("check")
def destinations_check(
    name: Annotated[str | None, typer.Argument(help="One destination (default: all).")] = None,
) -> None:
    """Check each destination's credentials with its cheapest authenticated call."""
    with _errors(), _runtime() as runtime:
        results = runtime.service.check_destinations(name)
    for destination, is_ok, message in results:
        mark = "[green]ok[/]" if is_ok else "[red]failed[/]"
        console.print(f"{destination}: {mark} {message}", highlight=False)
    if not all(is_ok for _, is_ok, _ in results):
        raise typer.Exit(1)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where the demo writes.")] = Path(
        "demo-output"
    ),
) -> None:
    """Build a sample shop, sync three audiences to a file, churn, sync again."""
    from worker.demo import run_demo

    with _errors():
        run_demo(directory, console)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    app()


if __name__ == "__main__":  # `python -m worker.cli`, as the crash tests run it
    main()
