"""The console's pages through Starlette's test client: what they show, 404s, escaping,
the token, /healthz and /metrics, and a session that refuses writes."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.testclient import TestClient

from models import SyncRun
from worker.alerts import AlertNotifier
from worker.console.app import COOKIE, check_bind, create_app, is_loopback
from worker.console.readonly import ReadOnlyError, read_only_engine, read_only_sessions
from worker.errors import ConfigError
from worker.metrics import registry_for
from worker.reports import ReportService
from worker.runtime import Runtime
from worker.settings import Settings
from worker.testing.databases import ShopSource
from worker.testing.factories import sync_all
from worker.testing.fake_destinations import FakeDestinations
from worker.testing.guarantees import error_lines, invoke, sync_to_fake

SCRIPT = "<script>alert(1)</script>"


@pytest.fixture
def console_reports(settings: Settings) -> Iterator[ReportService]:
    engine = read_only_engine(settings.database_url)
    yield ReportService(session_factory=read_only_sessions(engine))
    engine.dispose()


def client_for(reports: ReportService, *, token: str | None = None) -> TestClient:
    app = create_app(
        reports, registry=registry_for(reports), clock=lambda: datetime.now(UTC), token=token
    )
    return TestClient(app)


@pytest.fixture
def synced(runtime: Runtime, shop: ShopSource, tmp_path: Path, fake: FakeDestinations) -> Runtime:
    shop.add([(f"u{i}", None, 1, int(i < 3), 0) for i in range(60)])
    sync_to_fake(runtime, tmp_path, shop, fake, "Loyal", SCRIPT)
    fake.reject_items([f"u{i}" for i in range(3, 58)], message="<b>bad</b> contact")
    sync_all(runtime)
    return runtime


def test_pages_show_the_history(synced: Runtime, console_reports: ReportService) -> None:
    client = client_for(console_reports)
    with synced.sessions() as session:
        runs = {r.id: r for r in session.scalars(select(SyncRun))}
    overview = client.get("/")
    assert overview.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in overview.text
    assert SCRIPT not in overview.text
    loyal = next(r for r in runs.values() if r.failed)
    assert f'href="/runs/{loyal.id}"' in overview.text
    page = client.get("/audiences/loyal")
    assert page.status_code == 200
    assert f'<td class="num members">{loyal.members}</td>' in page.text
    assert "<svg" in page.text and "select user_id, email from people where a = 1" in page.text
    run = client.get(f"/runs/{loyal.id}")
    assert run.status_code == 200
    assert f'<dd class="sent">{loyal.sent}</dd>' in run.text
    assert f"Rejected users ({loyal.failed})" in run.text
    assert "&lt;b&gt;bad&lt;/b&gt; contact" in run.text and "<b>bad</b>" not in run.text
    assert "Page 1 of 2" in run.text and 'rel="next"' in run.text
    second = client.get(f"/runs/{loyal.id}?page=2")
    assert second.status_code == 200 and 'rel="prev"' in second.text
    assert second.text.count('class="user"') == loyal.failed - 50
    assert client.get(f"/runs/{loyal.id}?page=3").status_code == 404
    assert client.get("/failures").text.count('class="user"') == 55
    filtered = client.get("/?status=partial")
    assert filtered.text.count('class="audience"') == 1
    assert client.get("/?status=succeeded").text.count('class="audience"') == 1


def test_run_timings_per_phase_are_recorded_scraped_and_shown(
    synced: Runtime, console_reports: ReportService
) -> None:
    """A delivered run records how long its snapshot, diff and delivery took; /metrics
    gives the latest run's as `phase` series and the Run page shows them."""
    with synced.sessions() as session:
        runs = session.scalars(select(SyncRun).order_by(SyncRun.id)).all()
    assert runs
    for run in runs:
        assert run.snapshot_seconds is not None and run.snapshot_seconds > 0
        assert run.diff_seconds is not None and run.diff_seconds > 0
        assert run.delivery_seconds is not None and run.delivery_seconds >= 0
        assert run.finished_at is not None and run.delivery_started_at is not None
        assert run.delivery_seconds == pytest.approx(
            (run.finished_at - run.delivery_started_at).total_seconds()
        )
        phases = run.snapshot_seconds + run.diff_seconds + run.delivery_seconds
        assert phases <= (run.finished_at - run.started_at).total_seconds() + 1e-3
    client = client_for(console_reports)
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    durations = {
        (sample.labels["audience"], sample.labels["phase"]): sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
        if sample.name == "audience_sync_run_duration_seconds"
    }
    loyal = next(r for r in runs if r.failed)
    assert durations[("loyal", "snapshot")] == pytest.approx(loyal.snapshot_seconds)
    assert durations[("loyal", "diff")] == pytest.approx(loyal.diff_seconds)
    assert durations[("loyal", "delivery")] == pytest.approx(loyal.delivery_seconds)
    assert ("loyal", "total") in durations
    page = client.get(f"/runs/{loyal.id}")
    assert page.status_code == 200
    for phase in ("snapshot", "diff", "delivery"):
        seconds = getattr(loyal, f"{phase}_seconds")
        assert f'<dd class="{phase}-seconds">{seconds:.2f} s</dd>' in page.text


def test_user_lookup_shows_what_explain_shows(
    synced: Runtime, console_reports: ReportService
) -> None:
    client = client_for(console_reports)
    assert 'name="id"' in client.get("/users").text
    explained = console_reports.explain("u3")
    page = client.get("/users?id=u3")
    assert page.status_code == 200
    assert '<span id="user">u3</span>' in page.text
    loyal = next(s for s in explained if s.audience == "loyal")
    [ortto] = loyal.destinations
    # u3 was rejected by the loyal audience's destination: never told, owed true.
    assert (ortto.accepted_value, ortto.owed_value, ortto.rejections) == (None, True, 1)
    section = page.text.split('data-audience="loyal"')[1].split("</section>")[0]
    assert '<td class="accepted">never told</td>' in section
    assert '<td class="owed">true</td>' in section
    assert "&lt;b&gt;bad&lt;/b&gt; contact" in section
    # u1 is a member of both, accepted by the destination.
    page = client.get("/users?id=u1")
    script = page.text.split('data-audience="script_alert_1_script"')[1].split("</section>")[0]
    assert "A member" in script and '<td class="accepted">true</td>' in script
    # Users are linked from a run's rejections.
    with synced.sessions() as session:
        run_id = max(r.id for r in session.scalars(select(SyncRun)) if r.failed)
    assert 'href="/users?id=u3"' in client.get(f"/runs/{run_id}").text
    missing = client.get("/users?id=%3Cscript%3Ealert(1)%3C/script%3E")
    assert missing.status_code == 404
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in missing.text
    assert "<script>" not in missing.text
    assert client.get("/users?id=nobody").status_code == 404


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    "path",
    [
        "/audiences/nope",
        "/runs/123456",
        "/runs/abc",
        "/runs/1?page=x",
        "/failures?page=2",
        "/failures?page=0",
        "/failures?page=-1",
        "/audiences/..%2F..%2Fetc%2Fpasswd",
        "/../../etc/passwd",
        "/?status=%3Cscript%3E",
        "/nowhere",
    ],
)
def test_unknown_things_are_a_404_page(console_reports: ReportService, path: str) -> None:
    answer = client_for(console_reports).get(path)
    assert answer.status_code == 404
    assert "<h1>Not found</h1>" in answer.text
    assert "<script>" not in answer.text and "Traceback" not in answer.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_write_method_is_not_allowed(console_reports: ReportService) -> None:
    answer = client_for(console_reports).post("/", data={"x": "1"})
    assert answer.status_code == 405
    assert "<h1>Method Not Allowed</h1>" in answer.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_healthz_wants_a_recent_dispatcher_tick(
    runtime: Runtime, console_reports: ReportService
) -> None:
    client = client_for(console_reports)
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json() == {
        "status": "unhealthy",
        "reason": "beat's dispatcher has never run",
        "dispatcher_at": None,
    }
    ticked = datetime.now(UTC) - timedelta(minutes=2)
    AlertNotifier(sessions=runtime.sessions, env={}, clock=lambda: ticked).dispatcher_ticked()
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.json()["status"] == "ok"
    long_ago = datetime.now(UTC) - timedelta(minutes=4)
    AlertNotifier(sessions=runtime.sessions, env={}, clock=lambda: long_ago).dispatcher_ticked()
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["reason"].startswith("beat's dispatcher last ran at ")


def test_healthz_when_the_database_is_gone(tmp_path: Path) -> None:
    engine = read_only_engine(f"sqlite:///{tmp_path / 'missing' / 'state.db'}")
    answer = client_for(ReportService(session_factory=read_only_sessions(engine))).get("/healthz")
    assert answer.status_code == 503
    assert answer.json()["reason"].startswith("state database: ")


def test_metrics_page(synced: Runtime, console_reports: ReportService) -> None:
    answer = client_for(console_reports).get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert 'audience_sync_members{audience="loyal"} 60.0' in answer.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_token_guards_every_page(runtime: Runtime, console_reports: ReportService) -> None:
    client = client_for(console_reports, token="s3cret-token")
    for path in ("/", "/failures", "/metrics", "/audiences/x", "/runs/1"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert 'name="token"' in answer.text
    assert client.get("/healthz").status_code == 503  # open to health checkers
    assert client.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    wrong = client.post("/login", data={"token": "wrong"}, follow_redirects=False)
    assert wrong.status_code == 401
    signed_in = client.post("/login", data={"token": "s3cret-token"}, follow_redirects=False)
    assert signed_in.status_code == 303
    assert client.cookies.get(COOKIE) == "s3cret-token"
    assert client.get("/").status_code == 200
    assert "s3cret-token" not in client.get("/").text


@pytest.mark.parametrize(
    ("host", "token", "is_refused"),
    [
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("0.0.0.0", None, True),
        ("192.168.1.5", None, True),
        ("example.com", None, True),
        ("0.0.0.0", "t", False),
    ],
)
def test_bind_beyond_this_machine_needs_a_token(
    host: str, token: str | None, is_refused: bool
) -> None:
    assert is_loopback(host) == (host in ("127.0.0.1", "localhost", "::1"))
    if is_refused:
        with pytest.raises(ConfigError, match="AUDIENCE_SYNC_CONSOLE_TOKEN"):
            check_bind(host, token)
    else:
        check_bind(host, token)


def test_the_console_session_refuses_writes(synced: Runtime, settings: Settings) -> None:
    engine = read_only_engine(settings.database_url)
    sessions = read_only_sessions(engine)
    try:
        with sessions() as session:
            run = session.scalars(select(SyncRun)).first()
            assert run is not None
            run.members = 0
            with pytest.raises(ReadOnlyError):
                session.flush()
        with sessions() as session, pytest.raises((OperationalError, SQLAlchemyError)):
            # Below the ORM too: the connection itself is read-only.
            session.execute(text("update sync_runs set members = 0"))
            session.commit()
    finally:
        engine.dispose()
    with synced.sessions() as session:
        assert all(r.members for r in session.scalars(select(SyncRun)))


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_refuses_a_public_bind_without_a_token(cli: None) -> None:
    result = invoke("console", "--host", "0.0.0.0")
    assert result.exit_code == 2
    [line] = error_lines(result)
    assert "without a token: set AUDIENCE_SYNC_CONSOLE_TOKEN" in line
