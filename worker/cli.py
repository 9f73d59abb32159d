"""The `audience-sync` command line: thin commands that call the service."""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from worker import db, render
from worker.config import load_config
from worker.errors import AudienceSyncError
from worker.reports import ReportService
from worker.repositories import runs as run_repo
from worker.runtime import Runtime, build_runtime
from worker.service import NoProgress, Progress, SyncRequest
from worker.settings import get_settings

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
BAD_STATUSES = {run_repo.FAILED, run_repo.BLOCKED, run_repo.PARTIAL}


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


def _fail(message: str, code: int = 2) -> NoReturn:
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


@contextmanager
def _runtime() -> Iterator[Runtime]:
    """This command's runtime, closed on the way out; what the user can fix is told in one
    line."""
    with _errors():
        runtime = build_runtime(get_settings(), progress=_progress_factory)
        try:
            yield runtime
        finally:
            runtime.close()


@contextmanager
def _reports() -> Iterator[ReportService]:
    with _runtime() as runtime:
        yield ReportService(session_factory=runtime.sessions)


def _print_json(record: object, *, indent: int | None = None) -> None:
    # Plain stdout, not rich: JSON must come out byte for byte, unwrapped and uncoloured.
    sys.stdout.write(json.dumps(record, indent=indent) + "\n")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the state database schema."""
    db.upgrade(get_settings().database_url)
    console.print("state database is up to date")


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="The audiences YAML file.")],
    check_queries: Annotated[
        bool, typer.Option(help="Run each query once (no rows) to refuse broken ones.")
    ] = True,
) -> None:
    """Create or update sources, destinations and audiences from FILE (all or nothing)."""
    with _runtime() as runtime:
        report = runtime.service.apply(load_config(file), check_queries=check_queries)
    for line in render.apply_lines(report):
        console.print(line)


@audiences_app.command("list")
def audiences_list() -> None:
    """List audiences with their keys, sources, schedules and destinations."""
    with _reports() as reports:
        audiences = reports.audiences()
    console.print(render.audiences_table(audiences))


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
        trigger="manual",
    )
    with _runtime() as runtime:
        pair_ids = runtime.service.select_pairs(
            audience_keys=keys or [], destination_name=destination
        )
        if not pair_ids:
            _fail("nothing to sync: no active audience with an enabled destination matches")
        if enqueue:
            _enqueue(pair_ids, request)
            return
        summaries = [runtime.service.sync_pair(pair_id, request) for pair_id in pair_ids]
    console.print(render.summaries_table(summaries))
    if any(s.status in BAD_STATUSES for s in summaries):
        raise typer.Exit(1)


def _enqueue(pair_ids: list[int], request: SyncRequest) -> None:
    # Imported here: only --enqueue needs Celery and its broker settings.
    from worker.tasks import enqueue_sync

    for pair_id in pair_ids:
        console.print(f"queued task {enqueue_sync(pair_id, request)} (pair {pair_id})")


@app.command()
def history(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Show the sync history."""
    with _reports() as reports:
        records = reports.history(audience_key=audience, limit=limit)
    if as_json:
        for record in records:
            _print_json(render.run_json(record))
    else:
        console.print(render.history_table(records))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run id (see `history`).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one run with its skipped rows and per-user failures."""
    with _reports() as reports:
        detail = reports.run(run_id)
    if detail is None:
        _fail(f"no run {run_id}")
    if as_json:
        _print_json(render.run_detail_json(detail), indent=2)
    else:
        console.print(*render.run_detail(detail), sep="\n")


@app.command()
def failures(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    all_failing: Annotated[
        bool, typer.Option("--all", help="Also users not (yet) quarantined.")
    ] = False,
) -> None:
    """List quarantined users (rejected too many times in a row)."""
    with _reports() as reports:
        users = reports.failing_users(audience_key=audience, only_quarantined=not all_failing)
    console.print(render.failing_users_table(users))


@app.command()
def archive(
    key: Annotated[str, typer.Argument(help="The audience key.")],
    exit_members: Annotated[
        bool, typer.Option("--exit-members", help="First send false to every member.")
    ] = False,
) -> None:
    """Archive an audience (no more syncs; history kept)."""
    with _runtime() as runtime:
        summaries = runtime.service.archive(key, exit_members=exit_members)
    if summaries:
        console.print(render.summaries_table(summaries))
    if any(s.status != run_repo.SUCCEEDED for s in summaries):
        _fail(f"audience {key!r} stays active: not every destination took the exits", 1)
    console.print(f"archived {key}")


@app.command()
def status() -> None:
    """Per audience and destination: last run, its status, next due time, running or not."""
    with _runtime() as runtime:
        rows = runtime.service.status()
    console.print(render.status_table(rows))


@destinations_app.command("check")
def destinations_check(
    name: Annotated[str | None, typer.Argument(help="One destination (default: all).")] = None,
) -> None:
    """Check each destination's credentials with its cheapest authenticated call."""
    with _runtime() as runtime:
        results = runtime.service.check_destinations(name)
    for destination, is_ok, message in results:
        console.print(render.check_line(destination, is_ok, message), highlight=False)
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
