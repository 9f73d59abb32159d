"""How runs, audiences, statuses and failures look on a terminal and as JSON: pure functions
from the service's plain values to rich renderables and JSON records, shared by the CLI and
the demo. Nothing here reads a database or prints."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from worker.domain import ApplyReport, PairStatus, RunSummary
from worker.payloads import Change
from worker.plan import Action

# Only named in annotations: the CLI imports this module at start, and these modules bring
# the state database's side with them (SQLAlchemy, the models, the repositories).
if TYPE_CHECKING:
    from worker.audiences import AudienceView, CompiledAudience, Preview
    from worker.plan import FieldChange, Plan
    from worker.reports import (
        AudienceListing,
        AudienceStanding,
        FailingUser,
        RunDetail,
        RunRecord,
    )

STATUS_COLOURS = {
    "succeeded": "green",
    "partial": "yellow",
    "failed": "red",
    "blocked": "red",
    "skipped": "dim",
    "running": "cyan",
    "cancelled": "yellow",
}
# fmt: off
HISTORY_COLUMNS = (
    "run", "audience", "destination", "mode", "trigger", "status", "started", "duration",
    "members", "entered", "exited", "sent", "failed", "error",
)
FAILING_USER_COLUMNS = (
    "audience", "destination", "user", "value", "rejections", "quarantined", "status",
    "message", "last run",
)
STATUS_COLUMNS = (
    "audience", "destination", "schedule", "last run", "status", "started", "next due",
    "running", "notes",
)
# fmt: on

_SummaryColumn = Callable[[RunSummary], "str | Text"]
_SUMMARY_COLUMNS: dict[str, _SummaryColumn] = {
    "run": lambda s: str(s.run_id),
    "audience": lambda s: s.audience_key,
    "destination": lambda s: s.destination,
    "mode": lambda s: s.mode,
    "status": lambda s: status_cell(s.status),
    "members": lambda s: str(s.members),
    "entered": lambda s: str(s.entered),
    "exited": lambda s: str(s.exited),
    "sent": lambda s: str(s.sent),
    "failed": lambda s: str(s.failed),
    "seconds": lambda s: f"{s.duration_seconds:.2f}",
    "error": lambda s: s.error or "",
}
# The demo's columns: the ones that tell the story of an initial then incremental sync.
_DEMO_COLUMNS = ("audience", "mode", "status", "members", "entered", "exited", "sent")


def status_word(status: str) -> str:
    """A run status in its colour (rich markup)."""
    return f"[{STATUS_COLOURS.get(status, 'white')}]{status}[/]"


def status_cell(status: str) -> Text:
    """A run status in its colour, as a table cell (the status itself is never markup)."""
    return Text(status, style=STATUS_COLOURS.get(status, "white"))


def cell(value: str | Text) -> Text:
    """A table cell: a string is data, shown as it is (an audience named `Users [beta]` or a
    user id `[/x]` is never read as rich markup); a Text keeps its own style."""
    return value if isinstance(value, Text) else Text(value)


def add_row(table: Table, *cells: str | Text) -> None:
    """Every data row of every table goes through here, so no data cell is read as markup."""
    table.add_row(*(cell(value) for value in cells))


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


def _time(value: datetime | None) -> str:
    # To the second: the table stays narrow; JSON and `runs show` keep the full time.
    return value.isoformat()[:19] if value is not None else ""


def duration(seconds: float | None) -> str:
    """A run's duration for a table: `0.4s`, `12.0s`, `3m05s`, `2h07m`; empty if unfinished."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _table(*headers: str, **options: Any) -> Table:
    # Fold, never cut: an id, a key or an error message is worth more than a straight column.
    table = Table(**options)
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


def json_value(value: Any) -> Any:
    """A plain value (dataclasses, mappings, sequences, datetimes) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    return value


def summaries_table(summaries: Sequence[RunSummary]) -> Table:
    """The runs a command just made, one row each."""
    table = _table(*_SUMMARY_COLUMNS)
    for summary in summaries:
        add_row(table, *(column(summary) for column in _SUMMARY_COLUMNS.values()))
    return table


def demo_table(summaries: Sequence[RunSummary]) -> Table:
    """The demo's runs, borderless, so that full audience keys fit an 80-column terminal."""
    table = Table(
        *_DEMO_COLUMNS,
        title="sync history",
        box=None,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        collapse_padding=True,
    )
    table.columns[0].min_width = max((len(s.audience_key) for s in summaries), default=8)
    for summary in summaries:
        add_row(table, *(_SUMMARY_COLUMNS[name](summary) for name in _DEMO_COLUMNS))
    return table


def history_table(records: Sequence[RunRecord]) -> Table:
    table = _table(*HISTORY_COLUMNS)
    for r in records:
        add_row(
            table,
            str(r.id),
            r.audience,
            r.destination,
            r.mode,
            r.trigger,
            status_cell(r.status),
            _time(r.started_at),
            duration(r.duration_seconds),
            *(str(n) for n in (r.members, r.entered, r.exited, r.sent, r.failed)),
            r.error or "",
        )
    return table


def run_json(record: RunRecord) -> dict[str, Any]:
    """One run as a JSON object (`history --json` prints an array of them)."""
    record_json: dict[str, Any] = json_value(record)
    return record_json


def run_detail_json(detail: RunDetail) -> dict[str, Any]:
    """One run with its per-user failures, as `runs show --json` prints it: `failures` holds
    the first ones, `failures_total` counts them all, `failures_truncated` says some are
    left out."""
    return {
        **run_json(detail.run),
        "failures": [
            {"user": f.user, "value": f.value, "status": f.status, "message": f.message}
            for f in detail.failures
        ],
        "failures_total": detail.failures_total,
        "failures_truncated": detail.failures_truncated,
    }


def run_detail(detail: RunDetail) -> list[RenderableType]:
    """One run field by field (`name: value` lines), its skipped rows and its failures."""
    # Every field of the run, then its skipped rows (a line of their own).
    lines: list[RenderableType] = [
        Text.assemble((f"{name}:", "bold"), f" {value}")
        for name, value in run_json(detail.run).items()
        if name != "skipped_rows"
    ]
    skipped = ", ".join(f"{reason}={count}" for reason, count in detail.run.skipped_rows.items())
    lines.append(Text.assemble(("skipped_rows:", "bold"), f" {skipped or 'none'}"))
    if detail.failures:
        table = _table("user", "value", "status", "message", title="per-user failures")
        for f in detail.failures:
            add_row(table, f.user, str(f.value).lower(), str(f.status or ""), f.message)
        lines.append(table)
        if detail.failures_truncated:
            # A line of its own: a table's title wraps to the table's width.
            lines.append(
                Text(
                    f"per-user failures (showing {len(detail.failures)} of {detail.failures_total})"
                )
            )
    return lines


def audiences_table(audiences: Sequence[AudienceListing]) -> Table:
    table = _table("key", "name", "source", "schedule", "destinations", "archived")
    for a in audiences:
        add_row(
            table,
            a.key,
            a.name,
            a.source,
            a.schedule,
            ", ".join(a.destinations),
            _yes(a.is_archived),
        )
    return table


def failing_users_table(users: Sequence[FailingUser]) -> RenderableType:
    if not users:
        return "no quarantined users"
    table = _table(*FAILING_USER_COLUMNS)
    for u in users:
        add_row(
            table,
            u.audience,
            u.destination,
            u.user,
            str(u.value).lower(),
            str(u.rejections),
            _yes(u.is_quarantined),
            str(u.last_status or ""),
            u.last_message,
            str(u.last_run_id),
        )
    return table


def status_table(rows: Sequence[PairStatus]) -> Table:
    table = _table(*STATUS_COLUMNS)
    for row in rows:
        add_row(
            table,
            row.audience_key,
            row.destination,
            row.schedule,
            str(row.last_run_id or ""),
            status_cell(row.last_status) if row.last_status else "never",
            _time(row.last_started_at),
            _time(row.next_due_at),
            row.run_state or _yes(row.is_running),
            FULL_SYNC_OWED if row.is_full_sync_owed else "",
        )
    return table


FULL_SYNC_OWED = "full sync owed"


def cancelled_line(summary: RunSummary, signal_name: str | None) -> str:
    """The one line `sync` prints when it stopped a run at a page boundary."""
    why = f"on {signal_name}" if signal_name else "as asked by `runs cancel`"
    return (
        f"cancelled run {summary.run_id} ({summary.audience_key} -> {summary.destination}) "
        f"{why} at a page boundary: {summary.sent} sent, {summary.failed} rejected; the lock "
        "is free and the next run sends the rest"
    )


def change_json(key: str, destination: str, change: Change) -> dict[str, Any]:
    """One change a dry run would send, as `sync --dry-run --show N --json` streams it."""
    return {
        "audience": key,
        "destination": destination,
        "user": change.member_id,
        "change": "enter" if change.value else "exit",
    }


def preview_lines(
    key: str, destination: str, shown: Mapping[bool, Sequence[str]], counts: Mapping[bool, int]
) -> list[str]:
    """What a dry run would send, up to N users each way (`sync --dry-run --show N`)."""
    lines = []
    for value, verb in ((True, "enter"), (False, "exit")):
        users = shown.get(value, ())
        total = counts.get(value, 0)
        more = f" (and {total - len(users)} more)" if total > len(users) else ""
        listed = ", ".join(users) if users else "nobody"
        lines.append(f"{key} -> {destination}: would {verb} {total}: {listed}{more}")
    return lines


def _value(value: bool | None) -> str:
    return "never told" if value is None else str(value).lower()


def explain_lines(user_id: str, standings: Sequence[AudienceStanding]) -> list[str]:
    """Where a user stands in each audience and at each destination (`explain`)."""
    if not standings:
        return [f"user {user_id}: no audience has a destination"]
    lines = []
    for standing in standings:
        if standing.is_member is None:
            member = "no snapshot yet"
        else:
            member = "member" if standing.is_member else "not a member"
            member += f" in the latest snapshot ({_time(standing.snapshot_at)})"
        lines.append(f"{standing.audience}: {member}")
        for d in standing.destinations:
            accepted = _value(d.accepted_value)
            if d.accepted_run_id is not None:
                accepted += f" (run {d.accepted_run_id}, {_time(d.accepted_at)})"
            flags = [
                f"owed {str(d.owed_value).lower()}" if d.owed_value is not None else "nothing owed",
                *(["in doubt"] if d.is_in_doubt else []),
                *([f"failing ({d.rejections} rejections)"] if d.is_failing else []),
                *(["quarantined"] if d.is_quarantined else []),
            ]
            lines.append(f"  {d.destination}: accepted {accepted}; {', '.join(flags)}")
            if d.last_message and (d.is_failing or d.is_quarantined):
                lines.append(f"    last message: {d.last_message}")
        if standing.history:
            events = ", ".join(
                f"{'entered' if e.is_member else 'exited'} {_time(e.at)}" for e in standing.history
            )
            lines.append(f"  history: {events}")
        else:
            lines.append("  history: never a member in the kept snapshots")
    return lines


def apply_lines(report: ApplyReport) -> list[str]:
    """What `apply` did, one line per kind of change that happened."""
    kinds = (
        ("created", report.created),
        ("updated", report.updated),
        ("archived", report.archived),
        ("unchanged", report.unchanged),
    )
    return [f"{label}: {', '.join(keys)}" for label, keys in kinds if keys]


def check_line(destination: str, is_ok: bool, message: str) -> str:
    """One destination's credential check (rich markup)."""
    mark = "[green]ok[/]" if is_ok else "[red]failed[/]"
    return f"{escape(destination)}: {mark} {escape(message)}"


def audience_definition(view: AudienceView) -> Text:
    """`audiences show`: the audience as it would be written in the audiences file."""
    document: dict[str, Any] = {
        "key": view.key,
        "name": view.name,
        "source": view.source,
        "schedule": view.schedule,
        "destinations": list(view.destinations),
    }
    if view.rules is not None:
        document["rules"] = view.rules
        document["include_anonymous"] = view.include_anonymous
    else:
        document["query"] = view.query
    if view.is_archived:
        document["archived"] = True
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return Text(text.rstrip("\n"))


def compiled_audience(compiled: CompiledAudience) -> Text:
    """`audiences show --sql`: the SQL the audience runs, its parameters as comments after
    it (a rule audience's values never enter the SQL text)."""
    if compiled.now is None:
        header = f"-- {compiled.key}: the SQL audience's query ({compiled.dialect})"
    else:
        header = (
            f"-- {compiled.key}: compiled for {compiled.dialect}, now = "
            f"{compiled.now.isoformat()} (each run compiles it again for its own start)"
        )
    lines = [header, compiled.sql.strip() + ";"]
    if compiled.params:
        lines.append("-- parameters:")
        lines += [f"--   :{name} = {_sql_value(value)}" for name, value in compiled.params.items()]
    return Text("\n".join(lines))


def _sql_value(value: Any) -> str:
    """A parameter's value as it reads in SQL (shown, never spliced into the query)."""
    if isinstance(value, datetime):
        return repr(value.isoformat(" "))
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


def audience_preview_lines(preview: Preview) -> list[RenderableType]:
    """`audiences preview`: the member count, rows left out, and the sample."""
    skipped = ", ".join(f"{reason} x{count}" for reason, count in sorted(preview.skipped.items()))
    count = f"{preview.key}: {preview.members} members" + (
        f" ({skipped} left out)" if skipped else ""
    )
    lines: list[RenderableType] = [Text(count)]
    if preview.sample:
        table = _table("user_id", "anonymous_id", "email")
        for row in preview.sample:
            member = Text(row.member_id)
            table.add_row(
                Text("") if row.is_anonymous else member,
                member if row.is_anonymous else Text(""),
                Text(row.email or ""),
            )
        lines.append(table)
    return lines


_PLAN_KINDS = ("source", "destination", "audience")
_PLAN_ACTIONS = (Action.CREATE, Action.CHANGE, Action.REVIVE, Action.ARCHIVE)


def _plan_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    if value is None:
        return "none"
    if isinstance(value, dict):  # a rule audience's rules (or a source's layout), in a line
        return json.dumps(value, ensure_ascii=False)
    # A query over several lines reads as one line in a plan (spacing never matters to it).
    return " ".join(str(value).split())


def _plan_change(change: FieldChange, *, is_new: bool) -> list[str]:
    if is_new:
        return [f"  {change.field}: {_plan_value(change.after)}"]
    if change.field in ("query", "rules"):
        return [
            f"  {change.field}:",
            f"    - {_plan_value(change.before)}",
            f"    + {_plan_value(change.after)}",
        ]
    return [f"  {change.field}: {_plan_value(change.before)} -> {_plan_value(change.after)}"]


def plan_lines(plan: Plan) -> list[str]:
    """The plan of an apply, plain text: each source, destination and audience it creates,
    changes (field by field), revives or archives, the unchanged ones on one line per kind,
    then a count."""
    lines = []
    for kind in _PLAN_KINDS:
        for item in plan.items:
            if item.kind != kind or item.action == Action.UNCHANGED:
                continue
            lines.append(f"{kind} {item.name}: {item.action}")
            for change in item.changes:
                lines += _plan_change(change, is_new=item.action == Action.CREATE)
            if item.action == Action.ARCHIVE:
                lines.append(
                    "  no more syncs; its destinations keep the trait "
                    f"(`audience-sync archive {item.name} --exit-members` sends them false)"
                )
        unchanged = plan.keys(kind, Action.UNCHANGED)
        if unchanged:
            lines.append(f"{kind}s unchanged: {', '.join(unchanged)}")
    counts = [
        f"{len([i for i in plan.items if i.kind == 'audience' and i.action == a])} to {a}"
        for a in _PLAN_ACTIONS
    ]
    lines.append(f"plan: audiences {', '.join(counts)}")
    return lines


def plan_json(plan: Plan, *, is_applied: bool) -> dict[str, Any]:
    """The plan as `apply --json` prints it."""
    return {
        "is_applied": is_applied,
        "refusals": list(plan.refusals),
        "items": [
            {
                "kind": item.kind,
                "name": item.name,
                "action": str(item.action),
                "changes": [json_value(change) for change in item.changes],
            }
            for item in plan.items
        ],
    }
