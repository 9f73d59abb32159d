"""The console in a real headless Chromium (Playwright driving the system's Chromium),
served by a real `audience-sync console` process over a demo-sized sync: every page opens,
the numbers shown are the database's (overview, audience, run, user), a script in an
audience's name is shown as text, and the token is enforced. Screenshots land in
tests/artifacts/.

These tests need /usr/bin/chromium (`make test` and `.ci/run` install it); without it they
fail, never skip.
"""

import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright
from rich.console import Console
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from models import Audience, SyncedMember, SyncRun
from worker.config import load_config
from worker.demo import run_demo
from worker.domain import SyncRequest
from worker.runtime import build_runtime
from worker.settings import Settings
from worker.testing.guarantees import cli_env, run_cli, start_cli

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCRIPT_NAME = "<script>alert(1)</script>"
TOKEN = "browser-test-token-1234"


@dataclass(frozen=True)
class Demo:
    state_url: str
    directory: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The demo's two syncs, then one more audience named like a script, synced too."""
    directory = tmp_path_factory.mktemp("console-demo")
    run_demo(directory, Console(quiet=True))
    state_url = f"sqlite:///{(directory / 'state.db').resolve()}"
    config = directory / "audiences.yml"
    config.write_text(
        config.read_text()
        + f"  - name: '{SCRIPT_NAME}'\n"
        + "    source: shop\n"
        + "    query: select id as user_id, email from users where id < 'u00050'\n"
        + "    destinations: [local]\n"
    )
    runtime = build_runtime(Settings(database_url=state_url), env={})
    try:
        runtime.service.apply(load_config(config, {}))
        [pair] = runtime.service.select_pairs(audience_keys=["script_alert_1_script"])
        runtime.service.sync_pair(pair, SyncRequest())
    finally:
        runtime.close()
    return Demo(state_url, directory)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: `apt-get install -y chromium` (make test does)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


def _serve(demo: Demo, *args: str, **settings: str) -> tuple["subprocess.Popen[str]", str]:
    port = _free_port()
    process = start_cli(
        "console", "--port", str(port), *args, env=cli_env(demo.state_url, **settings)
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{base}/healthz", timeout=2)
            return process, base
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, errors = process.communicate()
                raise AssertionError(f"the console did not start: {errors}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def console(demo: Demo) -> Iterator[str]:
    process, base = _serve(demo)
    yield base
    process.terminate()
    process.wait(10)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    dialogs: list[str] = []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    yield opened
    assert dialogs == [], "a script ran in the page"
    context.close()


def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _runs(demo: Demo) -> list[tuple[SyncRun, str]]:
    engine = create_engine(demo.state_url)
    try:
        with Session(engine) as session:
            return [
                (run, key)
                for run, key in session.execute(
                    select(SyncRun, Audience.key)
                    .join(Audience, Audience.id == SyncRun.audience_id)
                    .order_by(SyncRun.id)
                ).all()
            ]
    finally:
        engine.dispose()


def _pair_count(demo: Demo) -> int:
    """Pairs with a run: every pair of the demo, all succeeded."""
    runs = _runs(demo)
    assert all(run.status == "succeeded" for run, _ in runs)
    return len({key for _, key in runs})


def _a_synced_member(demo: Demo, key: str) -> tuple[str, int]:
    """A user the audience's destination holds as a member, and the run that told it."""
    engine = create_engine(demo.state_url)
    try:
        with Session(engine) as session:
            member, run_id = session.execute(
                select(SyncedMember.member_id, SyncedMember.run_id)
                .join(Audience, Audience.id == SyncedMember.audience_id)
                .where(Audience.key == key, SyncedMember.is_member.is_(True))
                .order_by(SyncedMember.member_id)
                .limit(1)
            ).one()
            return str(member), int(run_id)
    finally:
        engine.dispose()


def test_click_through_overview_audience_run_user(demo: Demo, console: str, page: Page) -> None:
    runs = _runs(demo)
    latest = {key: run for run, key in runs}  # by id order: the last one wins
    page.goto(console + "/")
    _shot(page, "overview")
    rows = page.locator("#pairs tbody tr")
    # The demo's audiences and the one named like a script, one destination each.
    assert rows.count() == len(latest) == _pair_count(demo) >= 4
    for key, run in latest.items():
        row = page.locator(f'#pairs tbody tr[data-audience="{key}"]')
        assert row.locator("td.members").inner_text() == str(run.members)
        assert row.locator("a.run").inner_text() == f"#{run.id}"
        assert row.locator("svg.spark").count() == 1

    page.locator('#pairs tr[data-audience="high_value_customers"] a.audience').click()
    page.wait_for_url("**/audiences/high_value_customers")
    _shot(page, "audience")
    assert page.locator("h1").inner_text() == "High-Value Customers"
    assert "sum(o.amount) >= 500" in page.locator("pre.query").inner_text()
    assert page.locator("svg.chart rect.entered").count() == 2
    mine = [run for run, key in runs if key == "high_value_customers"]
    shown = page.locator("#runs tbody tr")
    assert shown.count() == len(mine) == 2
    for run in mine:
        row = page.locator(f'#runs tr[data-run="{run.id}"]')
        cells = [
            row.locator(f"td.{name}").inner_text()
            for name in ("members", "entered", "exited", "sent")
        ]
        assert cells == [str(run.members), str(run.entered), str(run.exited), str(run.sent)]

    first = mine[0]
    page.locator(f'#runs tr[data-run="{first.id}"] a.run').click()
    page.wait_for_url(f"**/runs/{first.id}")
    _shot(page, "run")
    assert page.locator("dd.sent").inner_text() == str(first.sent)
    assert page.locator("dd.entered").inner_text() == str(first.entered)
    assert page.locator("dd.members").inner_text() == str(first.members)

    # ... then the user lookup, for a member the destination holds.
    user, run_id = _a_synced_member(demo, "high_value_customers")
    page.locator("#user-lookup").click()
    page.wait_for_url("**/users")
    page.fill('input[name="id"]', user)
    page.click('form.lookup button[type="submit"]')
    page.wait_for_url(f"**/users?id={user}")
    _shot(page, "user")
    assert page.locator("#user").inner_text() == user
    standing = page.locator('section.standing[data-audience="high_value_customers"]')
    assert standing.locator("p.membership").inner_text().startswith("A member")
    row = standing.locator('tr[data-destination="local"]')
    assert row.locator("td.accepted").inner_text() == "true"
    assert row.locator("a.run").inner_text() == f"#{run_id}"
    assert row.locator("td.owed").inner_text() == "nothing"
    answer = page.goto(console + "/users?id=no-such-user")
    assert answer is not None and answer.status == 404


def test_every_page_opens(demo: Demo, console: str, page: Page) -> None:
    runs = _runs(demo)
    for path, name in (("/failures", "failures"), (f"/runs/{runs[-1][0].id}", "last-run")):
        answer = page.goto(console + path)
        assert answer is not None and answer.status == 200, path
        _shot(page, name)
    answer = page.goto(console + "/?status=succeeded")
    assert answer is not None and answer.status == 200
    assert page.locator("#pairs tbody tr").count() == _pair_count(demo)
    for path in ("/audiences/no_such_audience", "/runs/999999", "/audiences/..%2F..%2Fetc"):
        answer = page.goto(console + path)
        assert answer is not None and answer.status == 404, path
        assert page.locator("h1").inner_text() == "Not found"
    _shot(page, "not-found")
    health = httpx.get(console + "/healthz")
    assert health.status_code == 503  # no beat in the demo
    assert health.json()["reason"] == "beat's dispatcher has never run"
    metrics = httpx.get(console + "/metrics")
    assert 'audience_sync_members{audience="newsletter_subscribers"}' in metrics.text


def test_a_script_in_a_name_is_shown_as_text(console: str, page: Page) -> None:
    page.goto(console + "/")
    link = page.locator('#pairs tr[data-audience="script_alert_1_script"] a.audience')
    assert link.inner_text() == SCRIPT_NAME
    link.click()
    page.wait_for_url("**/audiences/script_alert_1_script")
    assert page.locator("h1").inner_text() == SCRIPT_NAME
    assert page.locator("script").count() == 0
    _shot(page, "script-name")


def test_public_bind_without_a_token_is_refused(demo: Demo) -> None:
    result = run_cli("console", "--host", "0.0.0.0", env=cli_env(demo.state_url), timeout=30)
    assert result.returncode == 2
    assert "without a token: set AUDIENCE_SYNC_CONSOLE_TOKEN" in result.stderr


def test_with_a_token_pages_need_it(demo: Demo, page: Page) -> None:
    process, base = _serve(demo, "--host", "0.0.0.0", console_token=TOKEN)
    try:
        answer = page.goto(base + "/")
        assert answer is not None and answer.status == 401
        assert httpx.get(base + "/metrics").status_code == 401
        assert (
            httpx.get(base + "/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )
        page.fill('input[name="token"]', "not-the-token")
        page.click('button[type="submit"]')
        assert page.locator("#message").inner_text() == "That is not the console's token."
        page.fill('input[name="token"]', TOKEN)
        page.click('button[type="submit"]')
        page.wait_for_selector("#pairs")
        assert page.locator("#pairs tbody tr").count() == _pair_count(demo)
        _shot(page, "signed-in")
    finally:
        process.terminate()
        process.wait(10)
