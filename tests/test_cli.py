"""The `audience-sync` command line, through typer's CliRunner (SQLite state database, the
file destination): what each command prints and its exit status."""

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import cli
from worker.db import make_engine, make_session_factory
from worker.domain import SyncRequest
from worker.pool import DestinationPool, http_options
from worker.service import SyncService
from worker.settings import Settings, get_settings
from worker.testing.databases import ShopSource, state_database
from worker.testing.factories import audience, read_calls, write_config
from worker.testing.guarantees import cli_env, error_lines, invoke, point_cli_at, run_cli


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with state_database("sqlite", tmp_path) as url:
        point_cli_at(monkeypatch, url)
        yield url
    get_settings.cache_clear()


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[ShopSource]:
    source = ShopSource(f"sqlite:///{tmp_path / 'shop.db'}")
    source.add(
        [
            ("u1", "u1@example.com", 1, 1, 0),
            ("u2", None, 1, 0, 0),
            ("u3", None, 0, 1, 0),
        ]
    )
    yield source
    source.engine.dispose()


def _config(tmp_path: Path, shop: ShopSource, *names: str) -> Path:
    flags = {"Order Completed": "a", "High-Value Customers": "b"}
    return write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience(name, flags[name], schedule="every 2h") for name in names],
    )


def _table_rows(output: str, width: int) -> list[list[str]]:
    """The body rows of a rich table printed by a command (the header is drawn with
    other lines)."""
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == width:
            rows.append(cells)
    return rows


def _sync(*args: str) -> tuple[int, list[dict[str, object]]]:
    result = invoke("sync", *args)
    history = invoke("history", "--json")
    return result.exit_code, json.loads(history.stdout)


def _applied(result_stdout: str) -> list[str]:
    """The lines after the plan: what `apply` did."""
    lines = result_stdout.strip().splitlines()
    return lines[[i for i, line in enumerate(lines) if line.startswith("plan: ")][-1] + 1 :]


def test_apply_creates_updates_and_archives(state: str, shop: ShopSource, tmp_path: Path) -> None:
    both = _config(tmp_path, shop, "Order Completed", "High-Value Customers")
    result = invoke("apply", str(both))
    assert result.exit_code == 0, result.output
    assert _applied(result.stdout) == ["created: order_completed, high_value_customers"]
    assert _applied(invoke("apply", str(both)).stdout) == [
        "unchanged: order_completed, high_value_customers"
    ]
    listed = _table_rows(invoke("audiences", "list").stdout, 6)
    assert listed == [
        ["high_value_customers", "High-Value Customers", "shop", "every 2h", "local", ""],
        ["order_completed", "Order Completed", "shop", "every 2h", "local", ""],
    ]

    one = _config(tmp_path, shop, "Order Completed")
    assert _applied(invoke("apply", str(one)).stdout) == [
        "archived: high_value_customers",
        "unchanged: order_completed",
    ]
    listed = _table_rows(invoke("audiences", "list").stdout, 6)
    assert [row[0] for row in listed if row[5] == "yes"] == ["high_value_customers"]


def test_sync_and_history(state: str, shop: ShopSource, tmp_path: Path) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed", "High-Value Customers")))
    result = invoke("sync")
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.stdout, 12)
    assert [(row[1], row[3], row[4], row[5], row[8]) for row in rows] == [
        ("high_value_customers", "initial", "succeeded", "2", "2"),
        ("order_completed", "initial", "succeeded", "2", "2"),
    ]
    assert len(read_calls(tmp_path / "identify.ndjson")) == 4

    code, runs = _sync("order_completed", "--dry-run")
    assert code == 0 and (runs[0]["mode"], runs[0]["sent"]) == ("dry_run", 0)
    code, runs = _sync("order_completed", "--full")
    assert code == 0 and (runs[0]["mode"], runs[0]["sent"]) == ("full", 2)

    history = json.loads(invoke("history", "--json").stdout)
    assert [r["id"] for r in history] == [4, 3, 2, 1]  # newest first
    assert set(history[0]) >= {
        "id", "audience", "destination", "mode", "trigger", "status", "started_at",
        "finished_at", "members", "entered", "exited", "sent", "failed", "skipped_rows",
        "error", "duration_seconds",
    }  # fmt: skip
    assert all(isinstance(r["duration_seconds"], float) for r in history)
    limited = invoke("history", "--json", "--limit", "1", "--audience", "high_value_customers")
    assert [r["id"] for r in json.loads(limited.stdout)] == [1]
    table = _table_rows(invoke("history").stdout, 14)
    assert [row[0] for row in table] == ["4", "3", "2", "1"]
    assert all(row[7].endswith("s") for row in table)  # each run's duration


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sync", "no_such_audience"], "no audience with key 'no_such_audience'"),
        (["sync", "order_completed", "--all"], "not both"),
        (["sync", "--destination", "nowhere"], "no destination named 'nowhere'"),
        (["runs", "show", "999"], "no run 999"),
        (["runs", "show", "999", "--json"], "no run 999"),
        (["history", "--audience", "no_such_audience"], "no audience with key 'no_such_audience'"),
        (["history", "--audience", "nope", "--json"], "no audience with key 'nope'"),
        (["failures", "--audience", "nope"], "no audience with key 'nope'"),
        (["failures", "--audience", "nope", "--json"], "no audience with key 'nope'"),
        (["archive", "no_such_audience"], "no audience with key 'no_such_audience'"),
        (["apply", "no-such-file.yml"], "cannot read no-such-file.yml"),
        (["destinations", "check", "nowhere"], "no destination named 'nowhere'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    state: str, shop: ShopSource, tmp_path: Path, args: list[str], message: str
) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed")))
    result = invoke(*args)
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith("error: ") and message in line, line


def test_runs_that_fail_exit_1(state: str, shop: ShopSource, tmp_path: Path) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed")))
    shop.execute("alter table people rename to customers")
    code, runs = _sync("order_completed")
    assert code == 1
    assert runs[0]["status"] == "failed" and "people" in str(runs[0]["error"])


def test_runs_show(state: str, shop: ShopSource, tmp_path: Path) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed")))
    invoke("sync")
    shown = invoke("runs", "show", "1")
    assert shown.exit_code == 0
    fields = dict(line.split(": ", 1) for line in shown.stdout.splitlines() if ": " in line)
    assert fields["audience"] == "order_completed"
    assert (fields["status"], fields["members"], fields["sent"]) == ("succeeded", "2", "2")
    assert fields["skipped_rows"] == "none"
    as_json = json.loads(invoke("runs", "show", "1", "--json").stdout)
    assert (as_json["id"], as_json["failures"]) == (1, [])
    assert (as_json["failures_total"], as_json["failures_truncated"]) == (0, False)


def test_failures_and_archive(state: str, shop: ShopSource, tmp_path: Path) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed")))
    assert invoke("failures").stdout.strip() == "no quarantined users"
    invoke("sync")
    archived = invoke("archive", "order_completed", "--exit-members")
    assert archived.exit_code == 0, archived.output
    assert "archived order_completed" in archived.stdout
    calls = read_calls(tmp_path / "identify.ndjson")
    assert [(c["userId"], c["traits"]["order_completed"]) for c in calls[-2:]] == [
        ("u1", False),
        ("u2", False),
    ]
    assert invoke("status").stdout.count("order_completed") == 0  # archived: not scheduled


def test_status(state: str, shop: ShopSource, tmp_path: Path) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed")))
    [row] = _table_rows(invoke("status").stdout, 9)
    assert (row[0], row[1], row[2], row[4], row[7]) == (
        "order_completed",
        "local",
        "every 2h",
        "never",
        "",
    )
    invoke("sync")
    [row] = _table_rows(invoke("status").stdout, 9)
    assert (row[3], row[4], row[7]) == ("1", "succeeded", "")

    # A run in progress (started here, not finished) shows as running.
    settings = Settings(database_url=state)
    engine = make_engine(state)
    service = SyncService(
        session_factory=make_session_factory(engine),
        settings=settings,
        destinations=DestinationPool(http=http_options(settings)),
    )
    [pair] = service.select_pairs()
    service.start_run(pair, SyncRequest())
    engine.dispose()
    [row] = _table_rows(invoke("status").stdout, 9)
    # This process holds it, alive: `running`.
    assert (row[3], row[4], row[7]) == ("2", "running", "running")
    skipped = invoke("sync")
    # "Did nothing" has its own exit status, apart from success and failure.
    assert skipped.exit_code == 3 and "skipped" in skipped.stdout


def test_db_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_SYNC_DATABASE_URL", f"sqlite:///{tmp_path / 'new.db'}")
    get_settings.cache_clear()
    try:
        first = invoke("db", "upgrade")
        assert first.exit_code == 0 and "created the schema at revision" in first.stdout
        assert (tmp_path / "new.db").exists()
        assert invoke("audiences", "list").exit_code == 0
    finally:
        get_settings.cache_clear()


def test_every_read_command_prints_one_json_document(
    state: str, shop: ShopSource, tmp_path: Path
) -> None:
    invoke("apply", str(_config(tmp_path, shop, "Order Completed", "High-Value Customers")))
    invoke("sync")
    documents = {}
    for args in (
        ("status",),
        ("audiences", "list"),
        ("history",),
        ("history", "--audience", "order_completed"),
        ("runs", "show", "1"),
        ("failures",),
        ("failures", "--all", "--audience", "order_completed"),
    ):
        result = invoke(*args, "--json")
        assert result.exit_code == 0, result.output
        documents[args] = json.loads(result.stdout)  # one document, not lines
        assert isinstance(documents[args], list | dict)
    assert [r["audience_key"] for r in documents[("status",)]] == [
        "high_value_customers",
        "order_completed",
    ]
    assert documents[("status",)][0]["last_status"] == "succeeded"
    assert documents[("audiences", "list")][1] == {
        "key": "order_completed",
        "name": "Order Completed",
        "source": "shop",
        "schedule": "every 2h",
        "destinations": ["local"],
        "is_archived": False,
    }
    assert [r["id"] for r in documents[("history",)]] == [2, 1]
    assert [r["id"] for r in documents[("history", "--audience", "order_completed")]] == [2]
    assert documents[("runs", "show", "1")]["id"] == 1
    assert documents[("failures",)] == []


LONG_NAME = "Customers Who Completed An Order In The Last Thirty Days"
LONG_KEY = "customers_who_completed_an_order_in_the_last_thirty_days"
LONG_TABLE = "orders_completed_by_customers_in_the_last_thirty_days_of_the_year"


def test_piped_output_is_full_width_and_uncoloured(
    state: str, shop: ShopSource, tmp_path: Path
) -> None:
    """A real process writing to a pipe, in an 80-column environment: nothing is cut."""
    broken = {**audience(LONG_NAME, "a"), "query": f"select user_id from {LONG_TABLE}"}
    config = write_config(tmp_path, source_url=shop.url, audiences=[broken])
    env = {**cli_env(state), "COLUMNS": "80", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    assert run_cli("apply", str(config), "--no-check-queries", env=env).returncode == 0
    synced = run_cli("sync", env=env)
    assert synced.returncode == 1
    outputs = [synced.stdout]
    for args in (
        ("status",),
        ("audiences", "list"),
        ("history",),
        ("runs", "show", "1"),
        ("failures", "--all"),
    ):
        result = run_cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    for output in outputs:
        assert "…" not in output
        assert "\x1b[" not in output  # no colour codes
    history = outputs[3]
    [row] = _table_rows(history, 14)
    assert row[1] == LONG_KEY
    assert LONG_TABLE in row[-1] and row[-1].startswith("source shop: ")
    assert max(len(line) for line in history.splitlines()) > 80
    assert LONG_NAME in outputs[2]


def test_consoles_are_full_width_and_uncoloured_only_off_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("NO_COLOR", raising=False)
    piped = cli.make_console()  # pytest captures stdout: not a terminal
    assert (piped.width, piped.no_color, piped.color_system) == (cli.PIPED_WIDTH, True, None)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    terminal = cli.make_console()
    assert (terminal.width, terminal.no_color) == (80, False)


def test_a_directory_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = invoke("demo", "--dir", str(blocker / "demo"))
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert line.startswith("error: ") and "not-a-directory" in line, line


def test_names_with_brackets_print_as_they_are(
    state: str, shop: ShopSource, tmp_path: Path
) -> None:
    # An audience name is the user's text, never rich markup: `[red]` is not a colour and
    # `[/x]` does not close a tag (rich would raise MarkupError on it).
    names = {"Users [beta] [red]x": "beta_users", "Churned [/x]": "churned"}
    config = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience(name, "a", key=key) for name, key in names.items()],
    )
    assert invoke("apply", str(config)).exit_code == 0
    listed = invoke("audiences", "list")
    assert listed.exit_code == 0, listed.output
    assert [row[:2] for row in _table_rows(listed.stdout, 6)] == [
        ["beta_users", "Users [beta] [red]x"],
        ["churned", "Churned [/x]"],
    ]
