"""Rendering, pure: plain values in, rich renderables and JSON records out."""

import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from types import MappingProxyType

import pytest
from rich.console import Console, RenderableType

from worker import render
from worker.domain import ApplyReport, PairStatus, RunSummary
from worker.reports import AudienceListing, FailingUser, RunDetail, RunFailure, RunRecord

STARTED = datetime(2026, 11, 28, 9, 30, 15, 123456, tzinfo=UTC)
FINISHED = datetime(2026, 11, 28, 9, 31, tzinfo=UTC)


def _text(*renderables: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=250, color_system=None).print(*renderables, sep="\n")
    return out.getvalue()


def _rows(table: RenderableType) -> list[list[str]]:
    """The cells of each body row of a bordered table (its header is drawn with other
    lines)."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in _text(table).splitlines()
        if "│" in line
    ]


SUMMARY = RunSummary(
    7, "order_completed", "local", "incremental", "succeeded", 10, 3, 1, 4, 0, None, 1.234
)
SKIPPED = MappingProxyType({"null_id": 3, "duplicate_id": 1})
RECORD = RunRecord(
    7,
    "order_completed",
    "local",
    "incremental",
    "schedule",
    "partial",
    STARTED,
    FINISHED,
    10,
    3,
    1,
    4,
    2,
    SKIPPED,
    "2 user(s) rejected",
    44.876544,
)


@pytest.mark.parametrize(
    ("status", "markup"),
    [
        ("succeeded", "[green]succeeded[/]"),
        ("partial", "[yellow]partial[/]"),
        ("failed", "[red]failed[/]"),
        ("blocked", "[red]blocked[/]"),
        ("skipped", "[dim]skipped[/]"),
        ("running", "[cyan]running[/]"),
        ("something new", "[white]something new[/]"),
    ],
)
def test_status_word(status: str, markup: str) -> None:
    assert render.status_word(status) == markup


def test_summaries_table() -> None:
    table = render.summaries_table(
        [SUMMARY, replace(SUMMARY, status="failed", error="[boom] gone")]
    )
    assert [column.header for column in table.columns] == [
        "run", "audience", "destination", "mode", "status", "members", "entered", "exited",
        "sent", "failed", "seconds", "error",
    ]  # fmt: skip
    # An error's brackets are text, not markup.
    assert _rows(table) == [
        ["7", "order_completed", "local", "incremental", "succeeded", "10", "3", "1", "4", "0",
         "1.23", ""],
        ["7", "order_completed", "local", "incremental", "failed", "10", "3", "1", "4", "0",
         "1.23", "[boom] gone"],
    ]  # fmt: skip


def test_demo_table_fits_80_columns() -> None:
    long_key = "order_completed_last_30days"
    table = render.demo_table([replace(SUMMARY, audience_key=long_key), SUMMARY])
    lines = _text(table).splitlines()
    assert lines[0].strip() == "sync history"
    assert lines[1].split() == [
        "audience", "mode", "status", "members", "entered", "exited", "sent",
    ]  # fmt: skip
    assert lines[2].split() == [long_key, "incremental", "succeeded", "10", "3", "1", "4"]
    assert max(len(line.rstrip()) for line in lines) <= 80


def test_history_table_cuts_times_to_the_second() -> None:
    table = render.history_table([replace(RECORD, error=None)])
    assert [column.header for column in table.columns][:7] == [
        "run", "audience", "destination", "mode", "trigger", "status", "started",
    ]  # fmt: skip
    [row] = _rows(table)
    assert row == [
        "7", "order_completed", "local", "incremental", "schedule", "partial",
        "2026-11-28T09:30:15", "44.9s", "10", "3", "1", "4", "2", "",
    ]  # fmt: skip


def test_run_json_keeps_every_field_in_order() -> None:
    record = render.run_json(replace(RECORD, finished_at=None))
    assert list(record) == [
        "id", "audience", "destination", "mode", "trigger", "status", "started_at",
        "finished_at", "members", "entered", "exited", "sent", "failed", "skipped_rows",
        "error", "duration_seconds", "host", "pid", "task_id", "snapshot_seconds",
        "diff_seconds", "delivery_seconds",
    ]  # fmt: skip
    assert record["started_at"] == "2026-11-28T09:30:15.123456+00:00"
    assert record["finished_at"] is None
    assert record["skipped_rows"] == {"null_id": 3, "duplicate_id": 1}
    assert json.loads(json.dumps(record)) == record


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, ""),
        (0.04, "0.0s"),
        (12.34, "12.3s"),
        (59.94, "59.9s"),
        (60, "1m00s"),
        (185.9, "3m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7620, "2h07m"),
        (90000, "25h00m"),
    ],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert render.duration(seconds) == text


def test_json_value_of_plain_values() -> None:
    status = PairStatus(
        2, "b", "local", "every 2h", 4, "running", STARTED, FINISHED, True, "running", True
    )
    assert render.json_value([status]) == [
        {
            "pair_id": 2, "audience_key": "b", "destination": "local", "schedule": "every 2h",
            "last_run_id": 4, "last_status": "running",
            "last_started_at": "2026-11-28T09:30:15.123456+00:00",
            "next_due_at": "2026-11-28T09:31:00+00:00", "is_running": True,
            "run_state": "running", "is_full_sync_owed": True,
        }
    ]  # fmt: skip
    listing = AudienceListing("a", "A", "shop", "every 2h", ("local", "ortto"), False)
    assert render.json_value(listing)["destinations"] == ["local", "ortto"]
    assert render.json_value(SKIPPED) == {"null_id": 3, "duplicate_id": 1}


def test_tables_fold_long_cells_instead_of_cutting_them() -> None:
    long_error = "HTTP 401 from the destination: " + "the API key was refused " * 6
    narrow = io.StringIO()
    table = render.history_table([replace(RECORD, error=long_error)])
    Console(file=narrow, width=80, color_system=None).print(table)
    assert "…" not in narrow.getvalue()
    lines = narrow.getvalue().splitlines()
    body = lines[next(i for i, line in enumerate(lines) if line.startswith("┡")) + 1 :]
    folded = "".join(line.split("│")[-2] for line in body if "│" in line)
    assert folded.replace(" ", "") == long_error.replace(" ", "")


def test_run_detail_json_and_text() -> None:
    failure = RunFailure(user="u1", value=False, status=None, message="timed [out]")
    detail = RunDetail(RECORD, (failure,), 1)
    assert render.run_detail_json(detail)["failures"] == [
        {"user": "u1", "value": False, "status": None, "message": "timed [out]"}
    ]
    text = _text(*render.run_detail(detail))
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert fields["status"] == "partial"
    assert fields["started_at"] == "2026-11-28T09:30:15.123456+00:00"
    assert fields["error"] == "2 user(s) rejected"
    assert fields["skipped_rows"] == "null_id=3, duplicate_id=1"
    assert "per-user failures" in text
    assert ["u1", "false", "", "timed [out]"] in _rows(render.run_detail(detail)[-1])

    plain = _text(
        *render.run_detail(RunDetail(replace(RECORD, skipped_rows={}, error=None), (), 0))
    )
    assert "skipped_rows: none" in plain and "error: None" in plain
    assert "per-user failures" not in plain


def test_audiences_table() -> None:
    listing = [
        AudienceListing("a", "A", "shop", "every 2h", ("local", "ortto"), False),
        AudienceListing("b", "B", "shop", "0 * * * *", (), True),
    ]
    assert _rows(render.audiences_table(listing)) == [
        ["a", "A", "shop", "every 2h", "local, ortto", ""],
        ["b", "B", "shop", "0 * * * *", "", "yes"],
    ]


def test_failing_users_table() -> None:
    assert render.failing_users_table([]) == "no quarantined users"
    user = FailingUser("a", "ortto", "u1", True, 5, True, 400, "invalid", 9)
    assert _rows(render.failing_users_table([user])) == [
        ["a", "ortto", "u1", "true", "5", "yes", "400", "invalid", "9"]
    ]


def test_status_table() -> None:
    never = PairStatus(1, "a", "local", "every 2h", None, None, None, STARTED, False)
    running = PairStatus(2, "b", "local", "every 2h", 4, "running", STARTED, FINISHED, True)
    elsewhere = replace(
        running,
        run_state="running elsewhere (w2, pid 7, heartbeat 3 s ago)",
        is_full_sync_owed=True,
    )
    assert _rows(render.status_table([never, running, elsewhere])) == [
        ["a", "local", "every 2h", "", "never", "", "2026-11-28T09:30:15", "", ""],
        ["b", "local", "every 2h", "4", "running", "2026-11-28T09:30:15",
         "2026-11-28T09:31:00", "yes", ""],
        ["b", "local", "every 2h", "4", "running", "2026-11-28T09:30:15",
         "2026-11-28T09:31:00", "running elsewhere (w2, pid 7, heartbeat 3 s ago)",
         "full sync owed"],
    ]  # fmt: skip


def test_apply_lines_name_only_what_happened() -> None:
    report = ApplyReport(created=["a", "b"], archived=["c"])
    assert render.apply_lines(report) == ["created: a, b", "archived: c"]
    assert render.apply_lines(ApplyReport()) == []


@pytest.mark.parametrize(
    ("is_ok", "message", "line"),
    [
        (True, "key accepted", "ortto: [green]ok[/] key accepted"),
        (False, "HTTP 401 [unauthorized]", "ortto: [red]failed[/] HTTP 401 \\[unauthorized]"),
    ],
)
def test_check_line(is_ok: bool, message: str, line: str) -> None:
    assert render.check_line("ortto", is_ok, message) == line


MARKUP_LOOKALIKES = ("Users [beta] [red]x", "[/x]", "[bold]u1[/bold]", "\\[esc]")


@pytest.mark.parametrize("text", MARKUP_LOOKALIKES)
def test_data_cells_are_never_markup(text: str) -> None:
    # Every user-controlled cell (names, keys, user ids, messages) prints as it is.
    listing = AudienceListing(text, text, text, text, (text,), False)
    assert _rows(render.audiences_table([listing])) == [[text, text, text, text, text, ""]]
    user = FailingUser(text, text, text, True, 1, False, None, text, 3)
    assert _rows(render.failing_users_table([user])) == [
        [text, text, text, "true", "1", "", "", text, "3"]
    ]
    failure = RunFailure(user=text, value=True, status=400, message=text)
    detail = RunDetail(replace(RECORD, audience=text, destination=text), (failure,), 1)
    assert _rows(render.run_detail(detail)[-1]) == [[text, "true", "400", text]]
    assert f"audience: {text}" in _text(*render.run_detail(detail))
    summary = replace(SUMMARY, audience_key=text, destination=text, error=text)
    assert _rows(render.summaries_table([summary]))[0][1:3] == [text, text]
    assert _rows(render.summaries_table([summary]))[0][-1] == text
    [row] = _rows(render.history_table([replace(RECORD, audience=text, error=text)]))
    assert (row[1], row[-1]) == (text, text)
    status = PairStatus(1, text, text, text, None, None, None, None, False)
    assert _rows(render.status_table([status]))[0][:3] == [text, text, text]


def test_run_detail_says_when_failures_are_cut() -> None:
    shown = tuple(RunFailure(f"u{i}", True, 400, "invalid") for i in range(3))
    cut = RunDetail(RECORD, shown, 2500)
    as_json = render.run_detail_json(cut)
    assert (len(as_json["failures"]), as_json["failures_total"]) == (3, 2500)
    assert as_json["failures_truncated"] is True
    assert "per-user failures (showing 3 of 2500)" in _text(*render.run_detail(cut))
    whole = RunDetail(RECORD, shown, 3)
    assert render.run_detail_json(whole)["failures_truncated"] is False
    text = _text(*render.run_detail(whole))
    assert "per-user failures" in text and "showing" not in text
