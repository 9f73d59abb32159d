"""Guarantee 4: the mass-exit guard.

A run that would send `false` to more than `max_exit_fraction` of the members a destination
holds (default 0.5; ignored below 100 members), or whose source returns no rows where the
audience had members, stops before sending anything: status `blocked`, the figures in its
error, no snapshot kept. `sync --allow-mass-exit` lets it through.
"""

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Snapshot
from worker.runtime import Runtime
from worker.service import mass_exit_reason
from worker.testing.databases import ShopSource
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    invoke,
    sync_to_fake,
    wrong_values,
)

KEY = "mass_exit_test"


@pytest.mark.parametrize(
    ("members", "previous", "held", "exits", "fraction", "blocked_because"),
    [
        (70, 150, 150, 80, 0.5, "80 of 150 members (53%)"),
        (75, 150, 150, 75, 0.5, None),  # exactly half may leave
        (70, 150, 150, 80, 0.6, None),  # the audience's own limit
        (10, 150, 150, 140, 1.0, None),  # a limit of 1 turns the share rule off
        (1, 99, 99, 98, 0.5, None),  # below 100 members the share rule is off
        (49, 100, 100, 51, 0.5, "51 of 100 members (51%)"),  # from 100 on, it is on
        (0, 100, 100, 100, 0.5, "no rows where the audience had 100 members"),
        (0, 3, 3, 3, 0.5, "no rows where the audience had 3 members"),  # at any size
        (0, None, 5, 5, 0.5, "no rows where the audience had 5 members"),
        (0, 4, 0, 0, 0.5, "no rows where the audience had 4 members"),
        (0, None, 0, 0, 0.5, None),  # an audience that never had members
        (0, 0, 0, 0, 0.5, None),
        (100, 100, 100, 0, 0.5, None),
    ],
)
def test_mass_exit_reason(
    members: int,
    previous: int | None,
    held: int,
    exits: int,
    fraction: float,
    blocked_because: str | None,
) -> None:
    reason = mass_exit_reason(
        members=members,
        previous_members=previous,
        held_members=held,
        exits=exits,
        max_exit_fraction=fraction,
    )
    if blocked_because is None:
        assert reason is None
    else:
        assert reason is not None and blocked_because in reason
        assert "--allow-mass-exit" in reason


def _snapshots(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(Snapshot)) or 0


def _last_run() -> dict[str, object]:
    history = invoke("history", "--audience", KEY, "--limit", "1", "--json")
    [record] = json.loads(history.stdout)
    return record


def _blocked_then_allowed(
    runtime: Runtime, fake: FakeDestinations, shop: ShopSource, figures: str
) -> None:
    snapshots, requests = _snapshots(runtime), len(fake.arrivals())
    blocked = invoke("sync", KEY)
    assert blocked.exit_code == 1, blocked.output
    run = _last_run()
    assert run["status"] == "blocked"
    assert figures in str(run["error"]) and "--allow-mass-exit" in str(run["error"])
    assert (run["sent"], run["finished_at"] is not None) == (0, True)
    assert len(fake.arrivals()) == requests  # nothing sent
    assert _snapshots(runtime) == snapshots  # the suspicious snapshot is not kept
    assert invoke("sync", KEY).exit_code == 1  # and blocked again, until someone decides

    allowed = invoke("sync", KEY, "--allow-mass-exit")
    assert allowed.exit_code == 0, allowed.output
    assert _last_run()["status"] == "succeeded"
    assert wrong_values(fake.state("ortto")[KEY], shop.members("a")) == {}


def test_a_mass_exit_is_blocked_until_allowed(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    shop.add((f"u{i:03d}", None, 1, 0, 0) for i in range(150))
    sync_to_fake(runtime, tmp_path, shop, fake, "Mass Exit Test")
    assert invoke("sync", KEY).exit_code == 0

    shop.set_flag("a", [f"u{i:03d}" for i in range(75)], 0)  # half: allowed
    assert invoke("sync", KEY).exit_code == 0
    assert _last_run()["exited"] == 75

    shop.set_flag("a", [f"u{i:03d}" for i in range(75)], 1)
    assert invoke("sync", KEY).exit_code == 0
    shop.set_flag("a", [f"u{i:03d}" for i in range(76)], 0)  # one more: blocked
    _blocked_then_allowed(runtime, fake, shop, "76 of 150 members (51%)")


def test_an_empty_source_is_blocked_until_allowed(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(3))
    sync_to_fake(runtime, tmp_path, shop, fake, "Mass Exit Test")
    assert invoke("sync", KEY).exit_code == 0
    shop.execute("delete from people")  # a broken load job, say
    _blocked_then_allowed(runtime, fake, shop, "no rows where the audience had 3 members")
    assert fake.state("ortto")[KEY] == dict.fromkeys(["u0", "u1", "u2"], False)


def test_the_limit_is_per_audience(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations, cli: None
) -> None:
    shop.add((f"u{i:03d}", None, 1, 0, 0) for i in range(200))
    sync_to_fake(runtime, tmp_path, shop, fake, "Mass Exit Test", max_exit_fraction=0.9)
    assert invoke("sync", KEY).exit_code == 0
    shop.set_flag("a", [f"u{i:03d}" for i in range(170)], 0)  # 85%
    result = invoke("sync", KEY)
    assert result.exit_code == 0, result.output
    assert (_last_run()["status"], _last_run()["exited"]) == ("succeeded", 170)
