"""Whole syncs through the service on SQLite and PostgreSQL, to the file destination."""

import random
from pathlib import Path

import pytest
from sqlalchemy import func, select

from models import Snapshot, SyncedMember
from worker.runtime import Runtime
from worker.service import SyncRequest
from worker.testing.databases import ShopSource
from worker.testing.factories import (
    apply_file,
    audience,
    destination_state,
    read_calls,
    sync_all,
    write_config,
)

USERS = 10_000
KEYS = {"a": "order_completed_last_30days", "b": "high_value_customers", "c": "vip_eu_users"}


def _three_audiences(tmp_path: Path, shop: ShopSource) -> Path:
    return write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[
            audience("Order Completed Last 30days", "a"),
            audience("High-Value Customers", "b"),
            audience("VIP (EU) users!", "c"),
        ],
    )


def _populate(shop: ShopSource, rng: random.Random) -> None:
    shop.add(
        (
            f"u{i:05d}",
            f"u{i}@example.com",
            int(rng.random() < 0.5),
            int(rng.random() < 0.2),
            int(rng.random() < 0.05),
        )
        for i in range(USERS)
    )


def test_initial_then_incremental_sends_exactly_the_changes(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    rng = random.Random(1)
    _populate(shop, rng)
    apply_file(runtime, _three_audiences(tmp_path, shop))
    out = tmp_path / "identify.ndjson"

    first = sync_all(runtime)
    assert [s.status for s in first] == ["succeeded"] * 3
    assert {s.mode for s in first} == {"initial"}
    calls = read_calls(out)
    for flag, key in KEYS.items():
        members = shop.members(flag)
        sent = [c for c in calls if key in c["traits"]]
        assert {c["userId"] for c in sent} == members
        assert all(c["traits"][key] is True for c in sent)
        assert len(sent) == len(members)  # each member once
    by_key = {s.audience_key: s for s in first}
    assert by_key[KEYS["a"]].members == by_key[KEYS["a"]].entered == len(shop.members("a"))

    # Churn 5% of each audience's memberships.
    expected: dict[str, dict[str, bool]] = {}
    for flag, key in KEYS.items():
        flipped = rng.sample([f"u{i:05d}" for i in range(USERS)], USERS // 20)
        before = shop.members(flag)
        entering = [u for u in flipped if u not in before]
        leaving = [u for u in flipped if u in before]
        shop.set_flag(flag, entering, 1)
        shop.set_flag(flag, leaving, 0)
        expected[key] = {**dict.fromkeys(entering, True), **dict.fromkeys(leaving, False)}

    seen = len(calls)
    second = sync_all(runtime)
    new_calls = read_calls(out)[seen:]
    for summary in second:
        want = expected[summary.audience_key]
        got = [c for c in new_calls if summary.audience_key in c["traits"]]
        assert {c["userId"]: c["traits"][summary.audience_key] for c in got} == want
        assert len(got) == len(want)
        assert summary.mode == "incremental"
        assert summary.status == "succeeded"
        assert summary.entered == sum(want.values())
        assert summary.exited == len(want) - sum(want.values())
        assert summary.sent == len(want)
    # A third run with no change sends nothing.
    third = sync_all(runtime)
    assert sum(s.sent for s in third) == 0
    assert len(read_calls(out)) == seen + len(new_calls)


def test_identify_call_shape(tmp_path: Path, shop: ShopSource, runtime: Runtime) -> None:
    shop.add([("u1", "one@example.com", 1, 0, 0), ("u2", None, 1, 0, 0)])
    apply_file(runtime, _three_audiences(tmp_path, shop))
    sync_all(runtime, audience_keys=[KEYS["a"]])
    calls = {c["userId"]: c for c in read_calls(tmp_path / "identify.ndjson")}
    call = calls["u1"]
    assert call["type"] == "identify"
    assert call["anonymousId"] is None
    assert call["traits"] == {KEYS["a"]: True, "email": "one@example.com"}
    personas = call["context"]["personas"]
    assert personas["computation_class"] == "audience"
    assert personas["computation_key"] == KEYS["a"]
    assert call["messageId"].startswith("audience-sync-") and len(call["messageId"]) < 100
    assert call["timestamp"].endswith("Z")
    assert calls["u2"]["traits"] == {KEYS["a"]: True}


def test_dry_run_sends_and_changes_nothing(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(50))
    apply_file(runtime, _three_audiences(tmp_path, shop))
    [summary] = sync_all(runtime, SyncRequest(is_dry_run=True), audience_keys=[KEYS["a"]])
    assert (summary.mode, summary.status, summary.entered, summary.sent) == (
        "dry_run",
        "succeeded",
        50,
        0,
    )
    assert read_calls(tmp_path / "identify.ndjson") == []
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(SyncedMember)) == 0
        assert session.scalar(select(func.count()).select_from(Snapshot)) == 0
    [real] = sync_all(runtime, audience_keys=[KEYS["a"]])
    assert real.mode == "initial" and real.sent == 50


def test_full_sync_converges_destination_to_snapshot(
    tmp_path: Path, shop: ShopSource, runtime: Runtime
) -> None:
    shop.add((f"u{i}", None, int(i < 30), 0, 0) for i in range(40))
    apply_file(runtime, _three_audiences(tmp_path, shop))
    sync_all(runtime, audience_keys=[KEYS["a"]])
    shop.set_flag("a", [f"u{i}" for i in range(20, 30)], 0)  # 10 leave
    shop.set_flag("a", [f"u{i}" for i in range(30, 35)], 1)  # 5 join
    out = tmp_path / "identify.ndjson"
    seen = len(read_calls(out))
    [full] = sync_all(runtime, SyncRequest(is_full=True), audience_keys=[KEYS["a"]])
    resent = read_calls(out)[seen:]
    assert full.mode == "full" and full.status == "succeeded"
    # true for all 25 members, false for the 10 that left.
    assert full.sent == 35 and (full.entered, full.exited) == (5, 10)
    assert destination_state(resent, KEYS["a"]) == {
        **{f"u{i}": True for i in [*range(20), *range(30, 35)]},
        **{f"u{i}": False for i in range(20, 30)},
    }
    with runtime.sessions() as session:
        held = set(
            session.scalars(select(SyncedMember.member_id).where(SyncedMember.is_member.is_(True)))
        )
    assert held == shop.members("a")


def test_snapshots_are_pruned(tmp_path: Path, shop: ShopSource, runtime: Runtime) -> None:
    shop.add([("u1", None, 1, 0, 0)])
    apply_file(runtime, _three_audiences(tmp_path, shop))
    for _ in range(5):
        sync_all(runtime, audience_keys=[KEYS["a"]])
    with runtime.sessions() as session:
        kept = session.scalar(select(func.count()).select_from(Snapshot))
    assert kept == runtime.settings.snapshots_kept


@pytest.mark.parametrize("count", [0, 1, 1001])
def test_page_boundaries_deliver_everyone_once(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, count: int
) -> None:
    shop.add((f"u{i}", None, 1, 0, 0) for i in range(count))
    apply_file(runtime, _three_audiences(tmp_path, shop))
    [summary] = sync_all(runtime, audience_keys=[KEYS["a"]])
    calls = read_calls(tmp_path / "identify.ndjson")
    assert summary.sent == len(calls) == count
    assert len({c["userId"] for c in calls}) == count
