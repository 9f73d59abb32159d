"""Guarantee 3: per-user rejections are visible and bounded.

The fake Ortto endpoint rejects some users item by item. Each rejection is a failure row
of its run (user, value sent, status, message); the user is tried again by later runs;
after five rejections in a row (the default) the user is quarantined, listed by
`audience-sync failures`, left out of later runs, and tried again by
`sync --retry-quarantined`. A run with rejections ends `partial` (exit status 1).
"""

import json
from pathlib import Path
from typing import Any

from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    invoke,
    sync_to_fake,
)

KEY, OTHER = "rejection_test", "other_audience"


def _sync(*args: str) -> tuple[int, dict[str, Any]]:
    """`sync KEY ARGS`: the exit status and the run, as `runs show --json` tells it."""
    result = invoke("sync", KEY, *args)
    history = invoke("history", "--audience", KEY, "--limit", "1", "--json")
    run_id = json.loads(history.stdout)[0]["id"]
    shown = invoke("runs", "show", str(run_id), "--json")
    assert shown.exit_code == 0, shown.output
    return result.exit_code, json.loads(shown.stdout)


def _failures(*args: str) -> dict[tuple[str, str], list[str]]:
    """`failures ARGS` as {(audience, user): [the other cells]}."""
    result = invoke("failures", *args)
    assert result.exit_code == 0, result.output
    rows: dict[tuple[str, str], list[str]] = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 9 and cells[0] in (KEY, OTHER):
            rows[(cells[0], cells[2])] = cells[3:]
    return rows


def test_rejected_users_are_recorded_retried_and_quarantined(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    shop.add((f"u{i:02d}", None, 1, int(i == 3), 0) for i in range(10))
    sync_to_fake(runtime, tmp_path, shop, fake, "Rejection Test", "Other Audience")
    fake.reject_items(["u03", "u07"], status=400, message="invalid contact")

    status, run = _sync()
    assert (status, run["status"], run["sent"], run["failed"]) == (1, "partial", 8, 2)
    assert "2 user(s) rejected" in run["error"]
    assert sorted(run["failures"], key=lambda f: f["user"]) == [
        {"user": "u03", "value": True, "status": 400, "message": "invalid contact"},
        {"user": "u07", "value": True, "status": 400, "message": "invalid contact"},
    ]
    assert set(fake.state("ortto")[KEY]) == {f"u{i:02d}" for i in range(10)} - {"u03", "u07"}
    assert invoke("failures").stdout.strip() == "no quarantined users"
    assert invoke("sync", OTHER).exit_code == 1  # u03 is its one member

    # u09 leaves and its `false` is refused too: it stays a member in the synced state.
    shop.set_flag("a", ["u09"], 0)
    fake.reject_items(["u09"], status=422, message="locked")
    for attempt in range(2, 6):
        status, run = _sync()
        assert (status, run["status"]) == (1, "partial"), attempt
        failed = {(f["user"], f["value"], f["status"]) for f in run["failures"]}
        assert failed == {("u03", True, 400), ("u07", True, 400), ("u09", False, 422)}
    assert fake.state("ortto")[KEY]["u09"] is True

    # Five rejections in a row for u03 and u07 (quarantined), four for u09 (not yet).
    everyone = _failures("--all")
    assert {user: cells[1:3] for (key, user), cells in everyone.items() if key == KEY} == {
        "u03": ["5", "yes"],
        "u07": ["5", "yes"],
        "u09": ["4", ""],
    }
    # u03 is also a member of the other audience, rejected there too (once).
    assert everyone[(OTHER, "u03")][1:3] == ["1", ""]
    assert set(_failures()) == {(KEY, "u03"), (KEY, "u07")}
    assert set(_failures("--audience", OTHER)) == set()

    # Quarantined users are left out; u09 is tried a fifth time and quarantined too.
    status, run = _sync()
    assert {(f["user"], f["value"]) for f in run["failures"]} == {("u09", False)}
    assert set(_failures("--audience", KEY)) == {(KEY, "u03"), (KEY, "u07"), (KEY, "u09")}
    requests = len(fake.arrivals("ortto"))
    status, run = _sync()
    assert (status, run["status"], run["sent"], run["failed"]) == (0, "succeeded", 0, 0)
    assert len(fake.arrivals("ortto")) == requests  # nobody was sent anything

    # --retry-quarantined tries them again; still refused, their count starts over.
    status, run = _sync("--retry-quarantined")
    assert (status, run["status"], run["failed"]) == (1, "partial", 3)
    assert set(_failures("--audience", KEY)) == set()
    assert {user: cells[1] for (key, user), cells in _failures("--all").items() if key == KEY} == {
        "u03": "1",
        "u07": "1",
        "u09": "1",
    }

    # Once the destination takes them (a reset fake: it forgets what it held, too), one run
    # delivers them and clears their failures.
    fake.reset()
    status, run = _sync()
    assert (status, run["status"], run["sent"], run["failed"]) == (0, "succeeded", 3, 0)
    assert fake.state("ortto")[KEY] == {"u03": True, "u07": True, "u09": False}
    assert set(_failures("--all", "--audience", KEY)) == set()
