"""Who and why: `explain USER_ID` and `sync --dry-run --show N`, on both backends, against
the fake Ortto endpoint (which can reject a user); a run's progress on a terminal and its
per-phase log lines."""

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.domain import SyncRequest
from worker.runtime import Runtime
from worker.settings import get_settings
from worker.testing.databases import ShopSource
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import error_lines, invoke, point_cli_at, sync_to_fake

KEY = "ops_explain"


@pytest.fixture
def pair(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[int]:
    """u1 and u2 are members, u3 is not; the command line points at the same state."""
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0), ("u3", None, 0, 0, 0)])
    sync_to_fake(runtime, tmp_path, shop, fake, "Ops Explain")
    point_cli_at(monkeypatch, runtime.settings.database_url)
    [pair_id] = runtime.service.select_pairs()
    yield pair_id
    get_settings.cache_clear()


def _explain(*args: str) -> dict[str, object]:
    result = invoke("explain", *args, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def test_explain_tells_membership_values_runs_failures_and_history(
    pair: int, runtime: Runtime, shop: ShopSource, fake: FakeDestinations
) -> None:
    fake.reject_items(["u2"])
    first = runtime.service.sync_pair(pair, SyncRequest())
    assert (first.status, first.sent, first.failed) == ("partial", 1, 1)
    shop.set_flag("a", ["u1"], 0)  # u1 leaves
    second = runtime.service.sync_pair(pair, SyncRequest())

    u1 = _explain("u1")
    assert u1["user"] == "u1"
    [standing] = u1["audiences"]  # type: ignore[misc]
    assert standing["audience"] == KEY and standing["is_member"] is False
    [at_ortto] = standing["destinations"]
    assert at_ortto["destination"] == "ortto"
    assert (at_ortto["accepted_value"], at_ortto["accepted_run_id"]) == (False, second.run_id)
    assert at_ortto["owed_value"] is None
    assert not (at_ortto["is_failing"] or at_ortto["is_in_doubt"] or at_ortto["is_quarantined"])
    assert [event["is_member"] for event in standing["history"]] == [True, False]

    u2 = _explain("u2", "--audience", KEY)
    [standing] = u2["audiences"]  # type: ignore[misc]
    [at_ortto] = standing["destinations"]
    assert standing["is_member"] is True
    assert (at_ortto["accepted_value"], at_ortto["owed_value"]) == (None, True)
    assert (at_ortto["is_failing"], at_ortto["rejections"]) == (True, 2)
    assert at_ortto["last_message"] == "invalid contact"

    text = invoke("explain", "u2").stdout
    assert f"{KEY}: member in the latest snapshot" in text
    assert "ortto: accepted never told; owed true, failing (2 rejections)" in text
    assert "history: entered" in text

    never = _explain("nobody")
    [standing] = never["audiences"]  # type: ignore[misc]
    assert standing["is_member"] is False and standing["history"] == []
    assert standing["destinations"][0]["accepted_value"] is None

    unknown = invoke("explain", "u1", "--audience", "no_such_audience")
    assert unknown.exit_code == 2
    assert error_lines(unknown) == [
        "error: no audience with key 'no_such_audience'; `audience-sync audiences list` shows them"
    ]


def test_dry_run_show_lists_who_would_enter_and_exit(
    pair: int, runtime: Runtime, shop: ShopSource, fake: FakeDestinations
) -> None:
    assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    shop.add((f"n{i}", None, 1, 0, 0) for i in range(4))  # four join
    shop.set_flag("a", ["u1", "u2"], 0)  # two leave
    received = len(fake.items("ortto"))

    shown = invoke("sync", "--dry-run", "--show", "3")
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert f"{KEY} -> ortto: would enter 4: n0, n1, n2 (and 1 more)" in lines
    assert f"{KEY} -> ortto: would exit 2: u1, u2" in lines
    assert "dry_run" in shown.stdout  # the runs' table follows

    streamed = invoke("sync", "--dry-run", "--show", "1", "--json")
    assert streamed.exit_code == 0, streamed.stderr
    document = json.loads(streamed.stdout)
    assert [(c["user"], c["change"]) for c in document["changes"]] == [
        ("n0", "enter"),
        ("n1", "enter"),
        ("n2", "enter"),
        ("n3", "enter"),
        ("u1", "exit"),
        ("u2", "exit"),
    ]
    assert {c["audience"] for c in document["changes"]} == {KEY}
    assert [r["mode"] for r in document["runs"]] == ["dry_run"]
    assert len(fake.items("ortto")) == received  # a dry run sends nothing

    refused = invoke("sync", "--show", "3")
    assert refused.exit_code == 2
    assert error_lines(refused) == ["error: --show lists what a dry run would send: add --dry-run"]


def test_each_phase_of_a_run_logs_one_line_with_its_duration(
    pair: int, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="audience_sync"):
        summary = runtime.service.sync_pair(pair, SyncRequest())
    messages = [r.getMessage() for r in caplog.records if r.name == "audience_sync"]
    [read] = [m for m in messages if "source rows into snapshot" in m]
    assert f"run {summary.run_id} ({KEY} -> ortto): read 2 source rows" in read
    assert "(2 members) in " in read and " rows/s)" in read
    [diff] = [m for m in messages if "diff of" in m]
    assert diff.endswith(" s") and "2 to enter, 0 to exit" in diff


def test_progress_on_a_terminal_counts_rows_and_their_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    from worker import cli

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=150, color_system=None)
    monkeypatch.setattr(cli.out, "err_console", terminal)
    bar = cli._progress_factory()
    bar.start("shop -> ortto: reading the source into a snapshot", 0)  # total unknown
    bar.advance(1000)
    time.sleep(0.3)
    bar.advance(1000)
    time.sleep(0.3)  # the bar refreshes on its own
    bar.stop()
    shown = screen.getvalue()
    assert "reading the source into a snapshot" in shown
    assert "2000/?" in shown and " rows/s" in shown
