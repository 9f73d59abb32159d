"""Guarantee 9: `archive KEY --exit-members` sends `false` to every user the destination
holds as `true` for the audience (quarantined ones included), then archives it; without
`--exit-members` nothing is sent. If the exits cannot all be delivered, the audience stays
active (exit status 1) so that the archive can be tried again.
"""

import json
from pathlib import Path

import pytest

from worker.runtime import Runtime
from worker.testing.databases import ShopSource
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import error_lines, invoke, sync_to_fake

KEY = "archive_test"


@pytest.fixture
def cli_settings() -> dict[str, str]:
    return {"quarantine_after": "1"}


def _audiences() -> dict[str, bool]:
    """key -> archived, from `audiences list`."""
    listed = invoke("audiences", "list")
    assert listed.exit_code == 0, listed.output
    rows = {}
    for line in listed.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[0] == KEY:
            rows[cells[0]] = cells[5] == "yes"
    return rows


def _setup(tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations) -> None:
    """u0-u7 members (`true`), u8 and u9 told `false` when they left, u5 quarantined while
    leaving (its `false` was refused): the destination holds u0-u7 as `true`."""
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(10))
    sync_to_fake(runtime, tmp_path, shop, fake, "Archive Test")
    assert invoke("sync", KEY).exit_code == 0
    shop.set_flag("a", ["u8", "u9", "u5"], 0)
    fake.reject_items(["u5"])
    assert invoke("sync", KEY).exit_code == 1  # partial: u5 refused, and quarantined
    assert "u5" in invoke("failures").stdout
    shop.set_flag("a", ["u5"], 1)  # (the source no longer matters to an archive)
    fake.reset()  # a destination that now accepts everyone (and forgot what it held)


def test_archive_with_exit_members_sends_false_to_every_member(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    _setup(tmp_path, shop, runtime, fake)
    result = invoke("archive", KEY, "--exit-members")
    assert result.exit_code == 0, result.output
    assert f"archived {KEY}" in result.stdout
    held = {f"u{i}" for i in range(8)}
    assert fake.state("ortto")[KEY] == dict.fromkeys(held, False)
    assert len(fake.items("ortto")) == len(held)  # each once; u8 and u9 not again
    assert _audiences() == {KEY: True}
    [run] = json.loads(invoke("history", "--audience", KEY, "--limit", "1", "--json").stdout)
    assert (run["mode"], run["status"], run["exited"], run["sent"]) == (
        "archive",
        "succeeded",
        8,
        8,
    )

    refused = invoke("sync", KEY)
    assert refused.exit_code == 2
    [line] = error_lines(refused)
    assert "is archived" in line
    # Archiving again sends nothing more: the destination holds nobody now.
    assert invoke("archive", KEY, "--exit-members").exit_code == 0
    assert len(fake.items("ortto")) == len(held)


def test_archive_without_exit_members_sends_nothing(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    _setup(tmp_path, shop, runtime, fake)
    result = invoke("archive", KEY)
    assert result.exit_code == 0, result.output
    assert fake.arrivals() == []
    assert _audiences() == {KEY: True}


def test_an_archive_whose_exits_fail_leaves_the_audience_active(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    _setup(tmp_path, shop, runtime, fake)
    fake.stop()
    result = invoke("archive", KEY, "--exit-members")
    assert result.exit_code == 1
    assert "stays active" in result.stderr
    assert _audiences() == {KEY: False}

    fake.start()
    assert invoke("archive", KEY, "--exit-members").exit_code == 0
    assert fake.state("ortto")[KEY] == {f"u{i}": False for i in range(8)}
    assert _audiences() == {KEY: True}
