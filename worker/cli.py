"""The `audience-sync` command line: thin commands that call the service."""

import json
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

from worker import render
from worker.domain import NoProgress, Progress, RunStatus, RunSummary, SyncRequest, Trigger
from worker.errors import AudienceSyncError
from worker.logs import configure as configure_logs
from worker.payloads import Change
from worker.settings import get_settings

# The state database's side (SQLAlchemy, the models, the service and what it drives) is
# imported by the commands that use it: it is most of a start, which `--help`, a usage
# error and the other commands need not pay.
if TYPE_CHECKING:
    from worker.reports import ReportService
    from worker.runtime import Runtime

# No pretty tracebacks: a user sees one line; `--debug` prints the plain traceback.
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help=f"{__doc__}\n\n"
    "Exit status: 0 done; 1 a run failed, was blocked or partly rejected, or an unexpected "
    "error; 2 a usage or environment error, told in one line (nothing was changed); 3 a run "
    "was skipped (another run holds its audience and destination); 4 a run was cancelled "
    "with `runs cancel`; 130/143 `sync` stopped on SIGINT/SIGTERM.",
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(no_args_is_help=True, help="State database schema.")
audiences_app = typer.Typer(no_args_is_help=True, help="Audiences in the state database.")
runs_app = typer.Typer(no_args_is_help=True, help="Sync runs.")
destinations_app = typer.Typer(no_args_is_help=True, help="Destinations.")
app.add_typer(db_app, name="db")
app.add_typer(audiences_app, name="audiences")
app.add_typer(runs_app, name="runs")
app.add_typer(destinations_app, name="destinations")
metrics_app = typer.Typer(no_args_is_help=True, help="Prometheus metrics.")
app.add_typer(metrics_app, name="metrics")
alerts_app = typer.Typer(no_args_is_help=True, help="Alert webhooks (the `alerts:` section).")
app.add_typer(alerts_app, name="alerts")

# Wider than any line: piped output is never cut or wrapped, whatever COLUMNS says.
PIPED_WIDTH = 100_000
# `sync --enqueue` gives up on an unreachable broker after about this long.
BROKER_TIMEOUT_SECONDS = 2
USAGE_ERROR = 2
UNEXPECTED_ERROR = 1
# A run was skipped: another run holds the pair ("did nothing", not "succeeded").
SKIPPED_EXIT = 3
# A run was stopped by `audience-sync runs cancel`.
CANCELLED_EXIT = 4
# `sync` stopped on a signal: the shell's convention, 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def make_console(*, stderr: bool = False) -> Console:
    """A console for stdout or stderr: on a terminal, its width and colours; otherwise
    (a pipe, a file, a cron log) full width and no colours, so that nothing is cut."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPED_WIDTH, no_color=True, color_system=None)


@dataclass
class _Output:
    """Set up once per command by the app's callback (the streams may be swapped by then)."""

    console: Console = field(default_factory=make_console)
    err_console: Console = field(default_factory=lambda: make_console(stderr=True))
    is_debug: bool = False


out = _Output()
BAD_STATUSES = {RunStatus.FAILED, RunStatus.BLOCKED, RunStatus.PARTIAL}


class _RateColumn(ProgressColumn):
    """Rows per second so far."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} rows/s" if speed else "", style="progress.data.speed")


class _BarProgress:
    """A progress bar on a terminal, for long runs: rows so far and their rate (a phase
    whose total is not known beforehand, like reading the source, counts up)."""

    def __init__(self) -> None:
        self._bar = RichProgress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            console=out.err_console,
            transient=True,
        )
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total if total > 0 else None)

    def advance(self, amount: int) -> None:
        self._bar.advance(self._task, amount)

    def stop(self) -> None:
        self._bar.stop()


def _progress_factory() -> Progress:
    return _BarProgress() if out.err_console.is_terminal else NoProgress()


def _fail(message: str, code: int = USAGE_ERROR) -> NoReturn:
    # soft_wrap: one line whatever the terminal's width, so it can be grepped and logged.
    out.err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _settings_message(exc: ValidationError) -> str:
    problems = [
        f"AUDIENCE_SYNC_{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
        for error in exc.errors()
    ]
    return "invalid setting " + "; ".join(problems)


@app.callback()
def _main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of an error too.")
    ] = False,
) -> None:
    out.console = make_console()
    out.err_console = make_console(stderr=True)
    out.is_debug = debug


@contextmanager
def _errors() -> Iterator[None]:
    """One clear line and exit status 2 for anything the user can fix (`--debug` adds the
    traceback)."""
    try:
        yield
    except (AudienceSyncError, ValidationError, OSError) as exc:
        # OSError: a file or directory the user named cannot be read or written.
        if out.is_debug:
            traceback.print_exc()
        _fail(_settings_message(exc) if isinstance(exc, ValidationError) else str(exc))


@contextmanager
def _runtime() -> Iterator["Runtime"]:
    """This command's runtime, closed on the way out; what the user can fix is told in one
    line. A state database without the schema is refused before anything is opened."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker import db
    from worker.runtime import build_runtime

    with _errors():
        settings = get_settings()
        db.check_schema(settings.database_url)
        runtime = build_runtime(settings, progress=_progress_factory)
        try:
            yield runtime
        except SQLAlchemyError as exc:
            # The state database went away or refused mid-command (sources and destinations
            # raise the project's own errors).
            if out.is_debug:
                traceback.print_exc()
            _fail(
                f"state database at {db.safe_url(settings.database_url)}: "
                f"{_one_line(str(getattr(exc, 'orig', None) or exc))}"
            )
        finally:
            runtime.close()


@contextmanager
def _reports() -> Iterator["ReportService"]:
    from worker.reports import ReportService

    with _runtime() as runtime:
        yield ReportService(session_factory=runtime.sessions)


def _print_json(document: object) -> None:
    # Plain stdout, not rich: JSON must come out byte for byte, unwrapped and uncoloured.
    sys.stdout.write(json.dumps(render.json_value(document), indent=2) + "\n")


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the state database schema, and say which revision it is at."""
    from worker import db

    with _errors():
        url = get_settings().database_url
        outcome = db.upgrade(url)
    out.console.print(f"state database at {db.safe_url(url)}: {outcome.describe()}")


@app.command()
def apply(
    file: Annotated[Path, typer.Argument(help="The audiences YAML file.")],
    check_queries: Annotated[
        bool, typer.Option(help="Run each query once (no rows) to refuse broken ones.")
    ] = True,
    plan_only: Annotated[
        bool, typer.Option("--plan", help="Print what would change, change nothing.")
    ] = False,
    allow_archive_all: Annotated[
        bool,
        typer.Option("--allow-archive-all", help="Let the file archive every active audience."),
    ] = False,
    allow_new_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-new-key",
            metavar="KEY",
            help="Create this audience although it looks like a rename (repeatable).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Print the plan of FILE (what it creates, changes, revives, archives), then apply it
    (all or nothing). A file that would archive every active audience, or that looks like it
    renames an audience without `key:`, is refused (exit 2, nothing changed)."""
    from worker.config import load_config

    new_keys = tuple(allow_new_keys or ())
    with _runtime() as runtime:
        config = load_config(file)
        plan = runtime.service.plan(
            config,
            # A real apply checks the queries itself, before its transaction.
            check_queries=check_queries and plan_only,
            allow_archive_all=allow_archive_all,
            allowed_new_keys=new_keys,
        )
        is_applying = not plan_only and not plan.is_refused
        if not as_json:
            for line in render.plan_lines(plan):
                out.console.print(line, highlight=False, markup=False)
        report = (
            runtime.service.apply(
                config,
                check_queries=check_queries,
                allow_archive_all=allow_archive_all,
                allowed_new_keys=new_keys,
            )
            if is_applying
            else None
        )
    if as_json:
        _print_json(render.plan_json(plan, is_applied=report is not None))
    for refusal in plan.refusals:
        out.err_console.print(
            f"[bold red]refused:[/] {escape(refusal)}", highlight=False, soft_wrap=True
        )
    if plan.is_refused:
        raise typer.Exit(USAGE_ERROR)
    if report is None:
        if not as_json:
            out.console.print("nothing changed (--plan)")
        return
    if not as_json:
        for line in render.apply_lines(report):
            out.console.print(line)


@audiences_app.command("list")
def audiences_list(as_json: JsonOption = False) -> None:
    """List audiences with their keys, sources, schedules and destinations."""
    with _reports() as reports:
        audiences = reports.audiences()
    if as_json:
        _print_json(audiences)
    else:
        out.console.print(render.audiences_table(audiences))


@audiences_app.command("show")
def audiences_show(
    key: Annotated[str, typer.Argument(help="The audience key.")],
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL it runs, with its parameters.")
    ] = False,
) -> None:
    """Show an audience's definition (its query, or its rules); --sql compiles rules now."""
    with _runtime() as runtime:
        if sql:
            shown = render.compiled_audience(runtime.service.compiled_audience(key))
        else:
            shown = render.audience_definition(runtime.service.show_audience(key))
    out.console.print(shown, highlight=False)


@audiences_app.command("preview")
def audiences_preview(
    key: Annotated[str, typer.Argument(help="The audience key.")],
    limit: Annotated[int, typer.Option(min=0, help="How many members to list.")] = 10,
) -> None:
    """Count an audience's members in its source now and list a few; nothing is synced and
    the state database is only read."""
    with _runtime() as runtime:
        preview = runtime.service.preview_audience(key, limit=limit)
    out.console.print(*render.audience_preview_lines(preview), sep="\n", highlight=False)


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
    show: Annotated[
        int | None,
        typer.Option(
            "--show",
            min=0,
            help="With --dry-run: list up to N users who would enter and N who would exit "
            "(with --json, all of them).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Sync audiences now (in this process, or queued with --enqueue). SIGINT or SIGTERM
    stops at the next page boundary (the run is `cancelled`, its lock freed); a second
    SIGINT exits at once."""
    if keys and all_audiences:
        _fail("give audience keys or --all, not both")
    if show is not None and not dry_run:
        _fail("--show lists what a dry run would send: add --dry-run")
    request = SyncRequest(
        is_full=full,
        is_dry_run=dry_run,
        allow_mass_exit=allow_mass_exit,
        retry_quarantined=retry_quarantined,
        trigger=Trigger.MANUAL,
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
        if show is not None:
            summaries = _preview(runtime, pair_ids, request, show=show, as_json=as_json)
        else:
            with _stop_on_signals() as received:
                summaries = []
                for pair_id in pair_ids:
                    if received:
                        break
                    summaries.append(runtime.service.sync_pair(pair_id, request))
            if received:
                _stopped(summaries, received[0])
        if as_json and show is None:
            _print_json({"runs": summaries})
    if not as_json:
        out.console.print(render.summaries_table(summaries))
    raise typer.Exit(sync_exit_status([s.status for s in summaries]))


def sync_exit_status(statuses: list[str]) -> int:
    """`sync`'s exit status from its runs' statuses: a failure first, then a run stopped
    by `runs cancel`, then a run skipped because another run holds its pair."""
    if any(status in BAD_STATUSES for status in statuses):
        return 1
    if RunStatus.CANCELLED in statuses:
        return CANCELLED_EXIT
    if RunStatus.SKIPPED in statuses:
        return SKIPPED_EXIT
    return 0


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """While runs are delivered: the first SIGINT or SIGTERM asks them to stop at their
    next page boundary; a second one leaves at once (the pair's lock then expires)."""
    from worker.locking import PROCESS_STOP

    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        if received:
            os.write(2, b"interrupted again: exiting now; the run's lock expires by itself\n")
            os._exit(128 + signum)
        received.append(signum)
        PROCESS_STOP.request(f"cancelled on {signal.Signals(signum).name}")

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        # Once stopping, the handler stays to the end: a second signal while the command
        # winds down still exits at once, rather than as a traceback.
        PROCESS_STOP.clear()  # no run starts after this
        if not received:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _stopped(summaries: list[RunSummary], signum: int) -> NoReturn:
    """After a stop signal: one line on stderr, and 128 + the signal's number."""
    name = signal.Signals(signum).name
    cancelled = [s for s in summaries if s.status == RunStatus.CANCELLED]
    line = (
        render.cancelled_line(cancelled[-1], name)
        if cancelled
        else f"stopped on {name} between runs: {len(summaries)} run(s) done; the lock is free"
    )
    out.err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signum)


class _PreviewSink:
    """Takes a dry run's changes: keeps the first N each way for a terminal, or streams
    every one as an item of a JSON array."""

    def __init__(self, *, show: int, as_json: bool) -> None:
        self._show, self._as_json = show, as_json
        self._is_first = True
        self.key, self.destination = "", ""
        self.shown: dict[bool, list[str]] = {True: [], False: []}
        self.counts = {True: 0, False: 0}

    def start_pair(self, key: str, destination: str) -> None:
        self.key, self.destination = key, destination
        self.shown = {True: [], False: []}
        self.counts = {True: 0, False: 0}

    def __call__(self, change: Change) -> None:
        self.counts[change.value] += 1
        if self._as_json:
            item = json.dumps(render.change_json(self.key, self.destination, change))
            sys.stdout.write(("\n  " if self._is_first else ",\n  ") + item)
            self._is_first = False
        elif len(self.shown[change.value]) < self._show:
            self.shown[change.value].append(change.member_id)


def _preview(
    runtime: "Runtime", pair_ids: list[int], request: SyncRequest, *, show: int, as_json: bool
) -> list[RunSummary]:
    """Dry runs that list who would enter and exit: up to `show` users each way per pair on
    a terminal; with --json, every change, streamed as it is read (one JSON document)."""
    summaries = []
    sink = _PreviewSink(show=show, as_json=as_json)
    if as_json:
        sys.stdout.write('{"changes": [')
    for pair_id in pair_ids:
        sink.start_pair(*runtime.service.pair_names(pair_id))
        summaries.append(runtime.service.dry_run(pair_id, request, sink))
        if not as_json:
            for line in render.preview_lines(sink.key, sink.destination, sink.shown, sink.counts):
                out.console.print(line, markup=False, highlight=False, soft_wrap=True)
    if as_json:
        runs = json.dumps(render.json_value(summaries), indent=2)
        sys.stdout.write(f'\n],\n"runs": {runs}}}\n')
    return summaries


def _enqueue(pair_ids: list[int], request: SyncRequest) -> None:
    # Imported here: only --enqueue needs Celery and its broker settings.
    from kombu import Connection
    from kombu.exceptions import OperationalError
    from kombu.utils.url import maybe_sanitize_url

    from worker.celery import app as celery_app
    from worker.tasks import enqueue_sync

    url = str(celery_app.conf.broker_url)
    # Celery would retry an unreachable broker for a long while: try once, briefly, first.
    probe = Connection(
        url,
        connect_timeout=BROKER_TIMEOUT_SECONDS,
        transport_options={
            "socket_connect_timeout": BROKER_TIMEOUT_SECONDS,
            "socket_timeout": BROKER_TIMEOUT_SECONDS,
        },
    )
    try:
        probe.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_SECONDS)
        for pair_id in pair_ids:
            out.console.print(f"queued task {enqueue_sync(pair_id, request)} (pair {pair_id})")
    except (OperationalError, OSError) as exc:
        if out.is_debug:
            traceback.print_exc()
        _fail(
            f"cannot reach the broker at {maybe_sanitize_url(url)} ({_one_line(str(exc))}): "
            "is the broker running? check AUDIENCE_SYNC_BROKER_URL (default: "
            "AUDIENCE_SYNC_REDIS_URL)"
        )
    finally:
        probe.release()


@app.command()
def history(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    limit: Annotated[int, typer.Option(help="How many runs, newest first.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show the sync history, newest first, with each run's duration."""
    with _reports() as reports:
        records = reports.history(audience_key=audience, limit=limit)
    if as_json:
        _print_json([render.run_json(record) for record in records])
    else:
        out.console.print(render.history_table(records))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="The run id (see `history`).")],
    as_json: JsonOption = False,
) -> None:
    """Show one run with its skipped rows and per-user failures."""
    with _reports() as reports:
        detail = reports.run(run_id)
    if as_json:
        _print_json(render.run_detail_json(detail))
    else:
        out.console.print(*render.run_detail(detail), sep="\n")


@app.command()
def failures(
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    all_failing: Annotated[
        bool, typer.Option("--all", help="Also users not (yet) quarantined.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """List quarantined users (rejected too many times in a row)."""
    with _reports() as reports:
        users = reports.failing_users(audience_key=audience, only_quarantined=not all_failing)
    if as_json:
        _print_json(users)
    else:
        out.console.print(render.failing_users_table(users))


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
        out.console.print(render.summaries_table(summaries))
    if any(s.status != RunStatus.SUCCEEDED for s in summaries):
        _fail(f"audience {key!r} stays active: not every destination took the exits", 1)
    out.console.print(f"archived {key}")


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Per audience and destination: last run, its status, next due time, who runs it
    (`running`, `stale (...)`, `running elsewhere (...)`) and whether a full sync is owed."""
    with _runtime() as runtime:
        rows = runtime.service.status()
    if as_json:
        _print_json(rows)
    else:
        out.console.print(render.status_table(rows))


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[int, typer.Argument(help="The run id (see `status` or `history`).")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Close a dead run at once (cancelled) and free its pair's lock."
        ),
    ] = False,
) -> None:
    """Ask a running run to stop at its next page boundary (it ends `cancelled`)."""
    with _runtime() as runtime:
        message = runtime.service.cancel_run(run_id, force=force)
    out.console.print(message, markup=False, highlight=False)


@app.command()
def explain(
    user_id: Annotated[str, typer.Argument(help="The user id, exactly as the source has it.")],
    audience: Annotated[str | None, typer.Option(help="Only this audience key.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Why a user holds its value: per audience and destination, membership in the latest
    snapshot, the value last accepted and by which run, what is owed, doubts, failures,
    quarantine, and the user's entries and exits over the kept history."""
    with _reports() as reports:
        standings = reports.explain(user_id, audience_key=audience)
    if as_json:
        _print_json({"user": user_id, "audiences": standings})
    else:
        for line in render.explain_lines(user_id, standings):
            out.console.print(line, markup=False, highlight=False, soft_wrap=True)


@destinations_app.command("check")
def destinations_check(
    name: Annotated[str | None, typer.Argument(help="One destination (default: all).")] = None,
) -> None:
    """Check each destination's credentials with its cheapest authenticated call."""
    with _runtime() as runtime:
        results = runtime.service.check_destinations(name)
    for destination, is_ok, message in results:
        out.console.print(render.check_line(destination, is_ok, message), highlight=False)
    if not all(is_ok for _, is_ok, _ in results):
        raise typer.Exit(1)


@alerts_app.command("test")
def alerts_test(
    name: Annotated[str | None, typer.Argument(help="One alert (default: all).")] = None,
) -> None:
    """Post a test message to each alert webhook (or the named one), now."""
    with _runtime() as runtime:
        outcomes = runtime.alerts.send_test(name)
    for sent in outcomes:
        result = sent.outcome
        if result.is_delivered:
            out.console.print(f"{escape(sent.channel)}: delivered", highlight=False)
        else:
            out.console.print(
                f"{escape(sent.channel)}: not delivered after {result.attempts} attempt(s): "
                f"{escape(result.error or '')}",
                highlight=False,
                soft_wrap=True,
            )
    if not all(sent.outcome.is_delivered for sent in outcomes):
        raise typer.Exit(1)


@metrics_app.command("serve")
def metrics_serve(
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 9464,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
) -> None:
    """Serve the metrics for Prometheus at http://HOST:PORT/metrics (computed from the state
    database at each scrape)."""
    from worker.metrics import registry_for, serve

    with _reports() as reports:
        out.console.print(f"serving metrics on http://{host}:{port}/metrics", highlight=False)
        serve(registry_for(reports), host=host, port=port)


@app.command()
def console(
    host: Annotated[
        str, typer.Option(help="The address to listen on (beyond this machine: set a token).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8080,
) -> None:
    """Serve the read-only web console (overview, audiences, runs, users, failures,
    /healthz, /metrics). Listening beyond this machine needs AUDIENCE_SYNC_CONSOLE_TOKEN."""
    from worker import db
    from worker.console.app import check_bind
    from worker.console.server import console_token, run_console

    with _errors():
        settings = get_settings()
        check_bind(host, console_token(settings))
        db.check_schema(settings.database_url)
    run_console(settings, host=host, port=port)


@app.command()
def demo(
    directory: Annotated[Path, typer.Option("--dir", help="Where the demo writes.")] = Path(
        "demo-output"
    ),
) -> None:
    """Build a sample shop, sync four audiences (one of rules) to a file, churn, sync again."""
    from worker.demo import run_demo

    with _errors():
        run_demo(directory, out.console)


def _log_format() -> str:
    # A bad setting is told by the command that reads the settings, in its own words.
    try:
        return get_settings().log_format
    except ValidationError:
        return "text"


def main() -> None:
    """The entry point: what no command turned into a line of its own (a bug, most likely)
    is still one line, with the traceback behind `--debug`."""
    configure_logs(_log_format())
    try:
        app()
    except Exception as exc:
        if out.is_debug:
            raise
        message = _one_line(str(exc)) or type(exc).__name__
        sys.stderr.write(
            f"error: unexpected {type(exc).__name__}: {message} (`audience-sync --debug ...` "
            "prints the traceback)\n"
        )
        sys.exit(UNEXPECTED_ERROR)


if __name__ == "__main__":  # `python -m worker.cli`, as the crash tests run it
    main()
