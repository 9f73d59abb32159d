"""Whole syncs of the Engage outputs on SQLite and PostgreSQL against the local fakes: every
`send_as` on every destination that takes it, and native Ortto audiences, through initial,
incremental, full and archive-with-exit runs, counting exactly the calls of each type; the
configured space id in what is delivered; a rejected track event of `both`; an Ortto audience
that is gone or cannot be created; a SIGKILL during `both` delivery converging."""

import logging
import signal
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from models import AudienceDestination, SyncRun
from worker.context import utcnow
from worker.domain import SyncRequest
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import apply_file, audience, read_calls, write_config
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import (
    ORTTO_KEY_VARIABLE,
    cli_env,
    ortto_destination,
    run_cli,
    wrong_values,
)

KEY = "engage_test"
SPACE = "spa_e2eTest"
SEGMENT_KEY_VARIABLE = "SEGMENT_WRITE_KEY"
USERS = 300
LOCK_TTL = 5
# One received call: (type, user, value) with type identify, track or member (native).
Call = tuple[str, str, bool]


@pytest.fixture(autouse=True)
def segment_key(fake: FakeDestinations, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SEGMENT_KEY_VARIABLE, fake.segment_write_key)
    return fake.segment_write_key


def _user(i: int) -> str:
    return f"u{i:04d}"


def _destinations(fake: FakeDestinations, tmp_path: Path) -> dict[str, dict[str, Any]]:
    return {
        "ortto": ortto_destination(fake),
        "segment": {
            "type": "segment",
            "write_key": "${" + SEGMENT_KEY_VARIABLE + "}",
            "endpoint": fake.url,
            "rate_limit": "1000/s",
        },
        "native": {**ortto_destination(fake), "type": "ortto-audiences"},
        "local": {"type": "file", "path": str(tmp_path / "calls.ndjson")},
    }


def _apply(
    runtime: Runtime,
    tmp_path: Path,
    shop: ShopSource,
    fake: FakeDestinations,
    entries: list[Any],
    **extra: Any,
) -> None:
    path = write_config(
        tmp_path,
        source_url=shop.url,
        audiences=[audience("Engage Test", "a", destinations=entries, **extra)],
        destinations=_destinations(fake, tmp_path),
    )
    text = path.read_text()
    path.write_text(f"workspace:\n  space_id: {SPACE}\n{text}")
    apply_file(runtime, path)


def _value(call: dict[str, Any], bag: str) -> bool:
    value = (call.get(bag) or {}).get(KEY)
    assert isinstance(value, bool), call
    return value


def received(destination: str, fake: FakeDestinations, tmp_path: Path) -> list[Call]:
    """Every call the destination accepted, in order, as (type, user, value)."""
    if destination == "native":
        return [
            ("member", m.get("user_id") or m["anonymous_id"], m["audience"]["mode"] == "add")
            for m in fake.items("ortto-audiences")
        ]
    if destination == "ortto":
        return [
            (
                "track" if "event" in c else "identify",
                c.get("user_id") or c["anonymous_id"],
                _value(c, "properties" if "event" in c else "traits"),
            )
            for c in fake.items("ortto")
        ]
    calls = (
        fake.items("segment") if destination == "segment" else read_calls(tmp_path / "calls.ndjson")
    )
    for call in calls:
        assert call["context"]["personas"]["space_id"] == SPACE
        assert call["context"]["personas"]["namespace"] == SPACE
        if call["type"] == "track":
            assert call["event"] == (
                "Audience Entered" if _value(call, "properties") else "Audience Exited"
            )
            assert call["properties"]["audience_key"] == KEY
    return [
        (
            call["type"],
            call["userId"] or call["anonymousId"],
            _value(call, "properties" if call["type"] == "track" else "traits"),
        )
        for call in calls
    ]


def folded(calls: list[Call], kind: str) -> dict[str, bool]:
    state: dict[str, bool] = {}
    for call_type, user, value in calls:
        if call_type == kind:
            state[user] = value
    return state


# (destination entry, the call types each change becomes)
MODES = [
    ({"name": "ortto", "send_as": "track"}, ("track",)),
    ({"name": "ortto", "send_as": "both"}, ("identify", "track")),
    ({"name": "segment", "send_as": "track"}, ("track",)),
    ({"name": "segment", "send_as": "both"}, ("identify", "track")),
    ({"name": "local", "send_as": "track"}, ("track",)),
    ({"name": "local", "send_as": "both"}, ("identify", "track")),
    ({"name": "native"}, ("member",)),
    ({"name": "native", "ortto_audience_name": "Engage journeys"}, ("member",)),
]


@pytest.mark.parametrize(
    ("entry", "kinds"), MODES, ids=[f"{e['name']}-{e.get('send_as', 'x')}" for e, _ in MODES]
)
def test_initial_incremental_full_and_archive_with_exit(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    entry: dict[str, str],
    kinds: tuple[str, ...],
) -> None:
    destination = entry["name"]
    shop.add(
        (_user(i), f"{_user(i)}@example.com" if i % 2 else None, int(i < 200), 0, 0)
        for i in range(USERS)
    )
    _apply(runtime, tmp_path, shop, fake, [entry])
    service = runtime.service
    [pair] = service.select_pairs(audience_keys=[KEY])
    seen = 0

    def step(request: SyncRequest, mode: str, changes: int) -> list[Call]:
        nonlocal seen
        summary = service.sync_pair(pair, request)
        assert (summary.status, summary.mode, summary.sent) == ("succeeded", mode, changes)
        calls = received(destination, fake, tmp_path)
        new, seen = calls[seen:], len(calls)
        # Exactly one call of each type per change, and nothing else.
        assert Counter(call_type for call_type, _, _ in new) == Counter(
            dict.fromkeys(kinds, changes)
        )
        for kind in kinds:
            assert wrong_values(folded(calls, kind), shop.members("a")) == {}
        return new

    step(SyncRequest(), "initial", 200)
    shop.set_flag("a", [_user(i) for i in range(30)], 0)
    shop.set_flag("a", [_user(i) for i in range(200, 220)], 1)
    step(SyncRequest(), "incremental", 50)
    assert step(SyncRequest(), "incremental", 0) == []
    step(SyncRequest(is_full=True), "full", 190)

    [archived] = service.archive(KEY, exit_members=True)
    assert (archived.status, archived.mode, archived.sent) == ("succeeded", "archive", 190)
    calls = received(destination, fake, tmp_path)
    assert Counter(t for t, _, _ in calls[seen:]) == Counter(dict.fromkeys(kinds, 190))
    for kind in kinds:
        assert not any(folded(calls, kind).values())  # every member told it left

    if destination == "native":
        # One Ortto audience, created by the first run, checked by each later sync (the
        # archive removes its members from the audience the pair holds).
        [(audience_id, name)] = fake.audiences.items()
        assert name == entry.get("ortto_audience_name", "Engage Test")
        assert fake.state("ortto-audiences")[audience_id] == folded(calls, "member")
        paths = Counter(a.path for a in fake.arrivals("ortto-audiences") if a.method == "POST")
        assert paths == {"/v1/audiences/create": 1, "/v1/audiences/get": 3}


def test_every_destination_gets_the_configured_space_id(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 5), 0, 0) for i in range(10))
    _apply(runtime, tmp_path, shop, fake, ["local", "segment"])
    for pair in runtime.service.select_pairs(audience_keys=[KEY]):
        assert runtime.service.sync_pair(pair, SyncRequest()).status == "succeeded"
    for destination in ("local", "segment"):
        calls = received(destination, fake, tmp_path)  # checks space_id and namespace
        assert Counter(t for t, _, _ in calls) == {"identify": 5}


def test_a_rejected_track_of_both_is_a_per_user_failure(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 20), 0, 0) for i in range(30))
    _apply(runtime, tmp_path, shop, fake, [{"name": "ortto", "send_as": "both"}])
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    fake.reject_items([_user(5)], status=400, message="bad activity", path="/v1/track")
    first = runtime.service.sync_pair(pair, SyncRequest())
    assert (first.status, first.sent, first.failed) == ("partial", 19, 1)
    with runtime.sessions() as session:
        run = session.get(SyncRun, first.run_id)
        assert run is not None
    # The identify went through, the track did not: the user's state did not move.
    assert fake.state("ortto")[KEY][_user(5)] is True
    assert _user(5) not in fake.state("ortto-track")[KEY]

    fake.reset()
    second = runtime.service.sync_pair(pair, SyncRequest())
    assert (second.status, second.sent, second.failed) == ("succeeded", 1, 0)
    assert Counter(t for t, u, _ in received("ortto", fake, tmp_path) if u == _user(5)) == {
        "identify": 1,
        "track": 1,
    }
    assert len(fake.items("ortto")) == 2


def test_a_plain_destination_name_still_sends_identify_only(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, 1, 0, 0) for i in range(3))
    _apply(runtime, tmp_path, shop, fake, ["ortto"])
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    assert runtime.service.sync_pair(pair, SyncRequest()).sent == 3
    assert [a.path for a in fake.arrivals("ortto")] == ["/v1/identify"]


def _pair_field(runtime: Runtime) -> str | None:
    with runtime.sessions() as session:
        return session.scalar(select(AudienceDestination.external_field_id))


def test_an_ortto_audience_that_is_gone_is_recreated_and_the_run_is_full(
    tmp_path: Path,
    shop: ShopSource,
    runtime: Runtime,
    fake: FakeDestinations,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shop.add((_user(i), None, int(i < 40), 0, 0) for i in range(50))
    _apply(runtime, tmp_path, shop, fake, ["native"])
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    assert runtime.service.sync_pair(pair, SyncRequest()).sent == 40
    first = _pair_field(runtime)
    assert first is not None and fake.audiences == {first: "Engage Test"}

    fake.delete_audience(first)
    shop.set_flag("a", [_user(0)], 0)
    with caplog.at_level(logging.WARNING):
        summary = runtime.service.sync_pair(pair, SyncRequest())
    # Every member goes to the new audience; the one who left is told so too.
    assert (summary.status, summary.mode, summary.sent) == ("succeeded", "full", 40)
    second = _pair_field(runtime)
    assert second is not None and second != first
    assert fake.audiences == {second: "Engage Test"}
    assert fake.state("ortto-audiences")[second] == {_user(i): i > 0 for i in range(40)}
    assert any(
        r.levelno == logging.WARNING and "no longer has the audience" in r.getMessage()
        for r in caplog.records
    )
    assert runtime.service.sync_pair(pair, SyncRequest()).mode == "incremental"


def test_an_ortto_audience_that_cannot_be_created_fails_only_its_pair(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 10), 0, 0) for i in range(20))
    _apply(runtime, tmp_path, shop, fake, ["native", "ortto"])
    fake.add_fault(
        "client_error", status=400, message="audience limit reached", path="/v1/audiences/create"
    )
    summaries = {
        s.destination: s
        for s in (
            runtime.service.sync_pair(pair, SyncRequest())
            for pair in runtime.service.select_pairs(audience_keys=[KEY])
        )
    }
    assert summaries["native"].status == "failed"
    assert "audience limit reached" in str(summaries["native"].error)
    assert summaries["ortto"].status == "succeeded" and summaries["ortto"].sent == 10
    assert fake.items("ortto-audiences") == []
    assert _pair_field(runtime) is None
    # The next run creates it and sends every member.
    [native] = runtime.service.select_pairs(audience_keys=[KEY], destination_name="native")
    again = runtime.service.sync_pair(native, SyncRequest())
    assert (again.status, again.sent) == ("succeeded", 10)


def test_a_kill_during_both_delivery_converges(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 1000), 0, 0) for i in range(1500))
    _apply(runtime, tmp_path, shop, fake, [{"name": "ortto", "send_as": "both"}])
    env = cli_env(
        runtime.settings.database_url,
        lock_ttl_seconds=str(LOCK_TTL),
        crash_at="page_sent@2",
        backoff_base_seconds="0.01",
    )
    env[ORTTO_KEY_VARIABLE] = fake.ortto_key
    killed = run_cli("sync", KEY, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Two pages of 500 changes went out, each as 500 identifies and 500 track events.
    assert Counter(a.path for a in fake.arrivals("ortto")) == {
        "/v1/identify": 2,
        "/v1/track": 2,
    }

    def later() -> datetime:
        return utcnow() + timedelta(seconds=LOCK_TTL + 1)

    service = SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        clock=later,
    )
    [pair] = service.select_pairs(audience_keys=[KEY])
    shop.set_flag("a", [_user(i) for i in range(100)], 0)
    summary = service.sync_pair(pair, SyncRequest())
    assert summary.status == "succeeded", summary
    calls = received("ortto", fake, tmp_path)
    for kind in ("identify", "track"):
        assert wrong_values(folded(calls, kind), shop.members("a")) == {}
    # The unrecorded page is sent again, both calls of each change; nothing else twice.
    assert Counter(t for t, _, _ in calls) == {"identify": 1600, "track": 1600}


def test_a_recreated_audience_is_owed_a_full_run_until_one_completes(
    tmp_path: Path, shop: ShopSource, runtime: Runtime, fake: FakeDestinations
) -> None:
    shop.add((_user(i), None, int(i < 30), 0, 0) for i in range(40))
    _apply(runtime, tmp_path, shop, fake, ["native"])
    [pair] = runtime.service.select_pairs(audience_keys=[KEY])
    assert runtime.service.sync_pair(pair, SyncRequest()).sent == 30
    first = _pair_field(runtime)
    assert first is not None
    fake.delete_audience(first)
    # The run that recreates it fails delivering: Ortto answers 503 to each of its attempts.
    attempts = runtime.settings.max_attempts
    fake.add_fault("server_error", count=attempts, status=503, path="/v1/audiences/members")
    failed = runtime.service.sync_pair(pair, SyncRequest())
    assert (failed.status, failed.mode) == ("failed", "full")
    second = _pair_field(runtime)
    assert second not in (None, first)
    # The next run is full again, though Ortto has the new audience: it still lacks members.
    again = runtime.service.sync_pair(pair, SyncRequest())
    assert (again.status, again.mode, again.sent) == ("succeeded", "full", 30)
    assert fake.state("ortto-audiences")[str(second)] == dict.fromkeys(
        (_user(i) for i in range(30)), True
    )
    assert runtime.service.sync_pair(pair, SyncRequest()).mode == "incremental"
