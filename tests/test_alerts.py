"""Alerts: one webhook post per change of a pair's state, recorded, retried, never in the
way of a sync; the `alerts:` section's checks; `alerts test`."""

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from models import AlertSent
from worker.alerts import (
    OK,
    AlertFacts,
    AlertNotifier,
    alert_document,
    event_for,
    is_stale,
    stale_after,
    state_after_run,
)
from worker.config import load_config
from worker.domain import AlertEvent, RunStatus, SyncRequest
from worker.errors import ConfigError
from worker.repositories import alerts as alert_repo
from worker.runtime import Runtime
from worker.service import SyncService
from worker.testing.databases import ShopSource
from worker.testing.factories import audience
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import ORTTO_KEY_VARIABLE, error_lines, invoke, ortto_destination
from worker.testing.webhooks import WebhookReceiver
from worker.webhooks import WebhookPoster

HOOK_VARIABLE = "TEST_ALERT_WEBHOOK_URL"


# ----------------------------------------------------------------- pure rules


@pytest.mark.parametrize(
    ("previous", "current", "event"),
    [
        (None, OK, None),
        (OK, OK, None),
        (None, "failed", AlertEvent.FAILED),
        (OK, "failed", AlertEvent.FAILED),
        ("failed", "failed", None),
        ("failed", OK, AlertEvent.RECOVERED),
        ("blocked", OK, AlertEvent.RECOVERED),
        ("partial", OK, AlertEvent.RECOVERED),
        ("stale", OK, AlertEvent.RECOVERED),
        ("failed", "blocked", AlertEvent.BLOCKED),
        (OK, "partial", AlertEvent.PARTIAL),
        ("stale", "failed", AlertEvent.FAILED),
    ],
)
def test_event_for_a_change_of_state(
    previous: str | None, current: str, event: AlertEvent | None
) -> None:
    assert event_for(previous, current) == event


@pytest.mark.parametrize(
    ("status", "mode", "state"),
    [
        ("succeeded", "incremental", OK),
        ("partial", "full", "partial"),
        ("failed", "initial", "failed"),
        ("blocked", "incremental", "blocked"),
        ("skipped", "incremental", None),
        ("failed", "dry_run", None),
    ],
)
def test_state_after_run(status: str, mode: str, state: str | None) -> None:
    assert state_after_run(status, mode) == state


@pytest.mark.parametrize(
    ("schedule", "after"),
    [
        ("every 2h", timedelta(hours=4)),
        ("every 30m", timedelta(hours=1)),
        ("every 1d", timedelta(days=2)),
        ("0 */3 * * *", timedelta(hours=24)),
    ],
)
def test_stale_after_twice_the_interval_or_a_day_for_cron(schedule: str, after: timedelta) -> None:
    assert stale_after(schedule) == after


def test_is_stale_counts_from_the_last_delivery_or_creation() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    hour = timedelta(hours=1)
    check = {"schedule": "every 1h", "created_at": created}
    assert not is_stale(last_delivered_at=None, now=created + 2 * hour, **check)  # type: ignore[arg-type]
    assert is_stale(last_delivered_at=None, now=created + 3 * hour, **check)  # type: ignore[arg-type]
    later = created + 10 * hour
    assert not is_stale(last_delivered_at=later, now=later + 2 * hour, **check)  # type: ignore[arg-type]


def test_alert_document_is_slack_text_plus_the_facts() -> None:
    facts = AlertFacts(
        "failed", "vips", "ortto", "failed", run_id=7, error="boom", counts={"members": 3}
    )
    document = alert_document(facts, public_url="https://sync.example.com/")
    assert document["text"] == (
        "audience-sync: vips -> ortto failed (run 7): boom\nhttps://sync.example.com/runs/7"
    )
    assert document["audience_sync"] == {
        "event": "failed",
        "audience": "vips",
        "destination": "ortto",
        "status": "failed",
        "run_id": 7,
        "error": "boom",
        "counts": {"members": 3},
        "link": "https://sync.example.com/runs/7",
    }
    assert alert_document(facts, public_url=None)["audience_sync"]["link"] is None


# ----------------------------------------------------------------- the alerts section


def _file(
    directory: Path, shop: ShopSource, alerts: list[dict[str, Any]], **destination: Any
) -> Path:
    path = directory / "audiences.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "sources": {"shop": {"url": shop.url}},
                "destinations": {
                    "local": destination
                    or {"type": "file", "path": str(directory / "identify.ndjson")}
                },
                "audiences": [
                    audience("VIP users", "a", schedule="every 1h"),
                    audience("Churned", "b", schedule="every 1h"),
                ],
                "alerts": alerts,
            },
            sort_keys=False,
        )
    )
    return path


@pytest.mark.parametrize("backend", ["sqlite"])
def test_alerts_section_read_with_defaults(shop: ShopSource, tmp_path: Path) -> None:
    text = _file(tmp_path, shop, []).read_text() + (
        "  - name: data-team\n"
        '    url: "${HOOK}"\n'
        "    on: [failed, recovered]\n"
        "    audiences: [vip_users]\n"
        "  - name: everything\n"
        "    url: https://hooks.example.com/x\n"
    )
    path = tmp_path / "audiences.yml"
    path.write_text(text.replace("alerts: []\n", "alerts:\n"))
    config = load_config(path, {"HOOK": "https://hooks.example.com/secret"})
    first, second = config.alerts
    assert (first.name, first.url, first.events, first.audience_keys) == (
        "data-team",
        "${HOOK}",
        (AlertEvent.FAILED, AlertEvent.RECOVERED),
        ("vip_users",),
    )
    assert second.events == tuple(AlertEvent) and second.audience_keys is None


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    ("alert", "message"),
    [
        (
            {"name": "x", "url": "ftp://hooks.example.com/x"},
            "alerts[0] ('x').url: must be an http:// or https:// URL",
        ),
        ({"name": "x", "url": "hooks.example.com"}, "must be an http:// or https:// URL"),
        (
            {"name": "x", "url": "https://h.example.com", "on": ["failed", "exploded"]},
            "alerts.0.on.1: Input should be 'failed', 'blocked', 'partial', 'stale' or 'recovered'",
        ),
        (
            {"name": "x", "url": "https://h.example.com", "audiences": ["nope"]},
            "alerts[0] ('x').audiences: unknown audience key 'nope'; keys: churned, vip_users",
        ),
        ({"name": "x", "url": "https://h.example.com", "channel": "#data"}, "unknown key"),
        ({"name": "x", "url": "${UNSET_ALERT_URL}"}, "UNSET_ALERT_URL is not set"),
    ],
)
def test_bad_alerts_are_refused_with_their_line(
    shop: ShopSource, tmp_path: Path, alert: dict[str, Any], message: str
) -> None:
    path = _file(tmp_path, shop, [alert])
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path} (line ")


@pytest.mark.parametrize("backend", ["sqlite"])
def test_apply_with_a_bad_alert_exits_2_and_changes_nothing(
    cli: None, shop: ShopSource, tmp_path: Path
) -> None:
    path = _file(tmp_path, shop, [{"name": "x", "url": "file:///etc/passwd"}])
    result = invoke("apply", str(path))
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "must be an http:// or https:// URL" in line
    assert "etc/passwd" not in invoke("audiences", "list").stdout
    assert "vip_users" not in invoke("audiences", "list").stdout


# ----------------------------------------------------------------- posting


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def _quick_poster() -> WebhookPoster:
    return WebhookPoster(backoff_base=0.01, backoff_max=0.02)


def _service(runtime: Runtime, notifier: AlertNotifier, env: dict[str, str]) -> SyncService:
    return SyncService(
        session_factory=runtime.sessions,
        settings=runtime.settings,
        destinations=runtime.destinations,
        env=env,
        run_ended=notifier.run_ended,
    )


def _alerts_sent(runtime: Runtime) -> list[AlertSent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(AlertSent).order_by(AlertSent.id)))


def test_one_post_per_state_change_fail_recover_block_stale(
    runtime: Runtime, shop: ShopSource, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    env = {HOOK_VARIABLE: receiver.url}
    shop.add([(f"u{i}", f"u{i}@example.com", 1, 0, 0) for i in range(5)])
    path = _file(tmp_path, shop, [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}])
    runtime.service.apply(load_config(path, env))
    notifier = AlertNotifier(
        sessions=runtime.sessions,
        env=env,
        clock=lambda: datetime.now(UTC),
        public_url="http://console.example.com",
        poster=_quick_poster(),
    )
    service = _service(runtime, notifier, env)
    [vip] = service.select_pairs(audience_keys=["vip_users"])

    def sync() -> str:
        return service.sync_pair(vip, SyncRequest()).status

    assert sync() == RunStatus.SUCCEEDED  # a first success tells nothing
    shop.execute("alter table people rename to people_gone")
    assert [sync() for _ in range(5)] == [RunStatus.FAILED] * 5
    shop.execute("alter table people_gone rename to people")
    assert sync() == RunStatus.SUCCEEDED
    shop.set_flag("a", [f"u{i}" for i in range(5)], 0)
    assert [sync(), sync()] == [RunStatus.BLOCKED] * 2
    shop.set_flag("a", [f"u{i}" for i in range(5)], 1)
    assert sync() == RunStatus.SUCCEEDED
    assert sync() == RunStatus.SUCCEEDED
    notifier.wait()
    assert receiver.events() == ["failed", "recovered", "blocked", "recovered"]
    failed = receiver.posts[0]["audience_sync"]
    assert failed["audience"] == "vip_users" and failed["destination"] == "local"
    assert "people" in failed["error"] and failed["run_id"] == 2
    assert failed["link"] == "http://console.example.com/runs/2"
    assert receiver.posts[0]["text"].startswith("audience-sync: vip_users -> local failed (run 2)")

    # Beat's dispatcher finds both pairs stale after two hours without a delivery ("every
    # 1h"): churned never ran; vip_users last delivered just now. A second tick tells nothing.
    later = datetime.now(UTC) + timedelta(hours=2, minutes=1)
    ticking = AlertNotifier(
        sessions=runtime.sessions, env=env, clock=lambda: later, poster=_quick_poster()
    )
    ticking.dispatcher_ticked()
    ticking.dispatcher_ticked()
    ticking.wait()
    assert receiver.events()[4:] == ["stale", "stale"]
    assert {p["audience_sync"]["audience"] for p in receiver.posts[4:]} == {
        "vip_users",
        "churned",
    }
    assert sync() == RunStatus.SUCCEEDED
    notifier.wait()
    assert receiver.events()[6:] == ["recovered"]
    sent = _alerts_sent(runtime)
    assert [(a.event, a.outcome, a.attempts) for a in sent] == [
        (p["audience_sync"]["event"], "delivered", 1) for p in receiver.posts
    ]


def test_channels_filter_events_and_audiences(
    runtime: Runtime, shop: ShopSource, tmp_path: Path, receiver: WebhookReceiver
) -> None:
    env = {HOOK_VARIABLE: receiver.url}
    shop.add([("u1", None, 1, 1, 0)])
    hook = "${" + HOOK_VARIABLE + "}"
    path = _file(
        tmp_path,
        shop,
        [
            {"name": "vip-failures", "url": hook, "on": ["failed"], "audiences": ["vip_users"]},
            {"name": "recoveries", "url": hook + "?r", "on": ["recovered"]},
        ],
    )
    runtime.service.apply(load_config(path, env))
    notifier = AlertNotifier(
        sessions=runtime.sessions, env=env, clock=lambda: datetime.now(UTC), in_background=False
    )
    service = _service(runtime, notifier, env)
    shop.execute("alter table people rename to people_gone")
    for pair in service.select_pairs():
        service.sync_pair(pair, SyncRequest())  # both fail: only vip_users' is wanted
    shop.execute("alter table people_gone rename to people")
    for pair in service.select_pairs():
        service.sync_pair(pair, SyncRequest())  # both recover
    assert [
        (p["audience_sync"]["event"], p["audience_sync"]["audience"]) for p in receiver.posts
    ] == [
        ("failed", "vip_users"),
        ("recovered", "churned"),
        ("recovered", "vip_users"),
    ]
    assert receiver.paths == ["/hook", "/hook?r", "/hook?r"]


def test_an_undeliverable_alert_is_retried_recorded_logged_and_the_sync_goes_on(
    runtime: Runtime,
    shop: ShopSource,
    tmp_path: Path,
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {HOOK_VARIABLE: receiver.url}
    shop.add([("u1", None, 1, 0, 0)])
    path = _file(tmp_path, shop, [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}])
    runtime.service.apply(load_config(path, env))
    notifier = AlertNotifier(
        sessions=runtime.sessions,
        env=env,
        clock=lambda: datetime.now(UTC),
        poster=_quick_poster(),
        in_background=False,
    )
    service = _service(runtime, notifier, env)
    [vip] = service.select_pairs(audience_keys=["vip_users"])
    shop.execute("alter table people rename to people_gone")
    receiver.answer(503, 502, 500)
    with caplog.at_level(logging.ERROR, logger="audience_sync.alerts"):
        assert service.sync_pair(vip, SyncRequest()).status == RunStatus.FAILED
    [alert] = _alerts_sent(runtime)
    assert (alert.outcome, alert.attempts, alert.response_status) == ("failed", 3, 500)
    assert "the webhook answered 500" in (alert.error or "")
    assert len(receiver.posts) == 3
    [record] = [
        r for r in caplog.records if r.levelno == logging.ERROR and r.name == "audience_sync.alerts"
    ]
    assert "not delivered after 3 attempt(s)" in record.getMessage()
    assert receiver.url not in record.getMessage()
    # A 4xx is final: one attempt.
    shop.execute("alter table people_gone rename to people")
    receiver.answer(404)
    assert service.sync_pair(vip, SyncRequest()).status == RunStatus.SUCCEEDED
    last = _alerts_sent(runtime)[-1]
    assert (last.event, last.outcome, last.attempts, last.response_status) == (
        "recovered",
        "failed",
        1,
        404,
    )


def test_a_dead_webhook_does_not_slow_the_sync(
    runtime: Runtime, shop: ShopSource, tmp_path: Path
) -> None:
    # Nothing listens on this port: connections are refused, retried with backoff.
    env = {HOOK_VARIABLE: "http://127.0.0.1:9/hook"}
    shop.add([("u1", None, 1, 0, 0)])
    path = _file(tmp_path, shop, [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}])
    runtime.service.apply(load_config(path, env))
    notifier = AlertNotifier(
        sessions=runtime.sessions,
        env=env,
        clock=lambda: datetime.now(UTC),
        poster=WebhookPoster(backoff_base=1.0, backoff_max=1.0),
    )
    service = _service(runtime, notifier, env)
    shop.execute("alter table people rename to people_gone")
    [vip] = service.select_pairs(audience_keys=["vip_users"])
    summary = service.sync_pair(vip, SyncRequest())
    assert summary.status == RunStatus.FAILED
    assert summary.duration_seconds < 1.0  # the 2 s of backoff happen behind it
    notifier.wait()
    [alert] = _alerts_sent(runtime)
    assert (alert.outcome, alert.attempts) == ("failed", 3)
    assert alert.error == "cannot reach the webhook (ConnectError)"


def test_partial_runs_alert_once(
    runtime: Runtime,
    shop: ShopSource,
    tmp_path: Path,
    receiver: WebhookReceiver,
    fake: FakeDestinations,
) -> None:
    env = {HOOK_VARIABLE: receiver.url, **fake_env(fake)}
    shop.add([("u1", None, 1, 0, 0), ("u2", None, 1, 0, 0)])
    path = _file(
        tmp_path,
        shop,
        [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}],
        **ortto_destination(fake),
    )
    runtime.service.apply(load_config(path, env))
    notifier = AlertNotifier(
        sessions=runtime.sessions, env=env, clock=lambda: datetime.now(UTC), in_background=False
    )
    service = _service(runtime, notifier, env)
    [vip] = service.select_pairs(audience_keys=["vip_users"])
    fake.reject_items(["u2"])
    assert service.sync_pair(vip, SyncRequest()).status == RunStatus.PARTIAL
    assert service.sync_pair(vip, SyncRequest()).status == RunStatus.PARTIAL
    assert receiver.events() == ["partial"]
    assert receiver.posts[0]["audience_sync"]["counts"]["failed"] == 1


def fake_env(fake: FakeDestinations) -> dict[str, str]:
    return {ORTTO_KEY_VARIABLE: fake.ortto_key}


# ----------------------------------------------------------------- the command line


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_sync_sends_the_alert_and_alerts_test(
    cli: None,
    shop: ShopSource,
    tmp_path: Path,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(HOOK_VARIABLE, receiver.url)
    shop.add([("u1", None, 1, 0, 0)])
    path = _file(tmp_path, shop, [{"name": "team", "url": "${" + HOOK_VARIABLE + "}"}])
    assert invoke("apply", str(path)).exit_code == 0
    shop.execute("alter table people rename to people_gone")
    result = invoke("sync", "vip_users")
    assert result.exit_code == 1
    # The command returned: the alert was posted before the process would have exited.
    assert receiver.events() == ["failed"]

    result = invoke("alerts", "test")
    assert result.exit_code == 0, result.stderr
    assert "team: delivered" in result.stdout
    assert receiver.posts[-1]["audience_sync"]["event"] == "test"
    result = invoke("alerts", "test", "nobody")
    assert result.exit_code == 2
    assert error_lines(result) == ["error: no alert named 'nobody' (the `alerts:` section)"]
    receiver.answer(500, 500, 500)
    result = invoke("alerts", "test", "team")
    assert result.exit_code == 1
    assert "team: not delivered after 3 attempt(s): the webhook answered 500" in result.stdout


def test_apply_file_keeps_alerts_across_applies(
    runtime: Runtime, shop: ShopSource, tmp_path: Path
) -> None:
    env = {HOOK_VARIABLE: "https://hooks.example.com/x"}
    path = _file(tmp_path, shop, [{"name": "a", "url": "${" + HOOK_VARIABLE + "}"}])
    runtime.service.apply(load_config(path, env))
    path = _file(tmp_path, shop, [{"name": "b", "url": "https://hooks.example.com/b"}])
    runtime.service.apply(load_config(path, env))
    with runtime.sessions() as session:
        assert [(c.name, c.url) for c in alert_repo.channels(session)] == [
            ("b", "https://hooks.example.com/b")
        ]
