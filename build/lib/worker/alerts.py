"""Alerts: one webhook post per change of a pair's state (failed, blocked, partial, stale,
recovered), never one per run.

The process that ends a run records the pair's new state and the alerts it owes in one
transaction (so two processes never both send one), then posts them from a background
thread: a slow or dead webhook never holds a sync. Each post is retried (see
`worker.webhooks`), its outcome recorded in `alerts_sent`; one that cannot be delivered is
logged at ERROR. Beat's dispatcher calls `dispatcher_ticked` each minute, which records the
tick (read by the console's health check) and marks the pairs gone stale.
"""

import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from worker.db import unit_of_work
from worker.domain import AlertEvent, RunMode, RunStatus, RunSummary
from worker.envrefs import resolve_env
from worker.errors import ConfigError, NotFoundError
from worker.repositories import alerts as alert_repo
from worker.repositories import runs as run_repo
from worker.scheduling import parse_schedule
from worker.webhooks import PostOutcome, WebhookPoster

logger = logging.getLogger("audience_sync.alerts")

OK = "ok"  # the state of a pair whose last run delivered everything
STALE = "stale"
CRON_STALE_AFTER = timedelta(hours=24)
TEST_EVENT = "test"
# How long closing a process waits for the alerts still being posted.
DRAIN_SECONDS = 30.0

_RUN_STATES = {
    RunStatus.SUCCEEDED: OK,
    RunStatus.PARTIAL: AlertEvent.PARTIAL.value,
    RunStatus.FAILED: AlertEvent.FAILED.value,
    RunStatus.BLOCKED: AlertEvent.BLOCKED.value,
}


# ----------------------------------------------------------------- pure rules


def state_after_run(status: str, mode: str) -> str | None:
    """The pair's state a finished run shows (None: the run says nothing, e.g. a dry run
    or a skipped one)."""
    if mode == RunMode.DRY_RUN:
        return None
    return _RUN_STATES.get(RunStatus(status))


def event_for(previous: str | None, current: str) -> AlertEvent | None:
    """The alert a change of state owes: none for no change, `recovered` for a return to
    ok from a bad state, none for a first state that is ok."""
    if current == previous:
        return None
    if current == OK:
        return AlertEvent.RECOVERED if previous is not None and previous != OK else None
    return AlertEvent(current)


def stale_after(schedule: str) -> timedelta:
    """How long a pair may go without a delivering run: twice its interval, or 24 h for a
    cron schedule."""
    parsed = parse_schedule(schedule)
    return parsed.interval * 2 if parsed.interval is not None else CRON_STALE_AFTER


def is_stale(
    *, schedule: str, last_delivered_at: datetime | None, created_at: datetime, now: datetime
) -> bool:
    since = last_delivered_at or created_at
    return now - since > stale_after(schedule)


def is_wanted(
    events: Sequence[str], audience_keys: Sequence[str] | None, event: str, audience_key: str
) -> bool:
    return event in events and (audience_keys is None or audience_key in audience_keys)


@dataclass(frozen=True, slots=True)
class AlertFacts:
    """What an alert tells."""

    event: str
    audience: str
    destination: str
    status: str
    run_id: int | None = None
    error: str | None = None
    counts: Mapping[str, int] = field(default_factory=dict)


_HEADLINES = {
    AlertEvent.FAILED: "failed",
    AlertEvent.BLOCKED: "was blocked",
    AlertEvent.PARTIAL: "was partly rejected",
    AlertEvent.STALE: "has not synced in time (stale)",
    AlertEvent.RECOVERED: "recovered",
    TEST_EVENT: "test message",
}


def alert_document(facts: AlertFacts, *, public_url: str | None) -> dict[str, Any]:
    """The webhook body: Slack's `text`, plus the same facts structured."""
    link = None
    if public_url:
        base = public_url.rstrip("/")
        link = (
            f"{base}/runs/{facts.run_id}" if facts.run_id else f"{base}/audiences/{facts.audience}"
        )
    headline = _HEADLINES.get(facts.event, facts.event)
    text = f"audience-sync: {facts.audience} -> {facts.destination} {headline}"
    if facts.run_id:
        text += f" (run {facts.run_id})"
    if facts.error:
        text += f": {facts.error}"
    if link:
        text += f"\n{link}"
    return {
        "text": text,
        "audience_sync": {
            "event": facts.event,
            "audience": facts.audience,
            "destination": facts.destination,
            "status": facts.status,
            "run_id": facts.run_id,
            "error": facts.error,
            "counts": dict(facts.counts),
            "link": link,
        },
    }


# ----------------------------------------------------------------- the notifier


@dataclass(frozen=True, slots=True)
class _Pending:
    alert_id: int
    channel: str
    url: str  # template
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TestOutcome:
    channel: str
    outcome: PostOutcome


class AlertNotifier:
    """Records state changes and posts their alerts. `run_ended` and `dispatcher_ticked`
    never raise: an alert problem is logged, never a failed sync."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        env: Mapping[str, str],
        clock: Callable[[], datetime],
        public_url: str | None = None,
        poster: WebhookPoster | None = None,
        in_background: bool = True,
    ) -> None:
        self._sessions = sessions
        self._env = env
        self._clock = clock
        self._public_url = public_url
        self._poster = poster or WebhookPoster()
        self._in_background = in_background
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def run_ended(self, summary: RunSummary) -> None:
        """The hook a run calls once it is recorded as ended."""
        try:
            pending = self._note_run(summary)
        except Exception:
            # Whatever went wrong here must not fail the run that just ended; say it loudly.
            logger.exception("alerts for run %s could not be recorded", summary.run_id)
            return
        self._post_all(pending)

    def dispatcher_ticked(self) -> None:
        """Beat's dispatcher ran: record the tick, and alert on the pairs gone stale."""
        try:
            pending = self._note_tick()
        except Exception:
            logger.exception("the dispatcher's tick could not be recorded")
            return
        self._post_all(pending)

    def send_test(self, name: str | None = None) -> list[TestOutcome]:
        """Post a test message to the named channel (every channel when None), now."""
        now = self._clock()
        with unit_of_work(self._sessions) as session:
            found = alert_repo.channels(session)
            if name is not None:
                found = [c for c in found if c.name == name]
                if not found:
                    raise NotFoundError(f"no alert named {name!r} (the `alerts:` section)")
            if not found:
                raise ConfigError(
                    "no alerts are configured: add an `alerts:` section and `apply` the file"
                )
            facts = AlertFacts(TEST_EVENT, "(test)", "(test)", TEST_EVENT)
            document = alert_document(facts, public_url=self._public_url)
            pending = [
                _Pending(
                    alert_repo.record_alert(
                        session,
                        channel=c.name,
                        event=TEST_EVENT,
                        audience_key=None,
                        destination=None,
                        run_id=None,
                        now=now,
                    ),
                    c.name,
                    c.url,
                    document,
                )
                for c in found
            ]
        return [TestOutcome(p.channel, self._post(p)) for p in pending]

    def wait(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait for the alerts still being posted (a process about to exit)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)

    # ------------------------------------------------------------- recording

    def _note_run(self, summary: RunSummary) -> list[_Pending]:
        state = state_after_run(summary.status, summary.mode)
        if state is None:
            return []
        now = self._clock()
        with unit_of_work(self._sessions) as session:
            run = run_repo.get_run(session, summary.run_id)
            if run is None:
                return []
            previous = alert_repo.state_of(session, run.audience_id, run.destination_id)
            before = previous.state if previous is not None else None
            if before == state:
                return []
            alert_repo.set_state(
                session, run.audience_id, run.destination_id, state, run_id=run.id, now=now
            )
            event = event_for(before, state)
            if event is None:
                return []
            facts = AlertFacts(
                event=event.value,
                audience=summary.audience_key,
                destination=summary.destination,
                status=summary.status,
                run_id=summary.run_id,
                error=summary.error,
                counts={
                    "members": summary.members,
                    "entered": summary.entered,
                    "exited": summary.exited,
                    "sent": summary.sent,
                    "failed": summary.failed,
                },
            )
            return self._queue(session, facts, now=now)

    def _note_tick(self) -> list[_Pending]:
        now = self._clock()
        pending: list[_Pending] = []
        with unit_of_work(self._sessions) as session:
            alert_repo.beat(session, alert_repo.DISPATCHER, now=now)
            for pair in alert_repo.pair_activity(session):
                if pair.state not in (None, OK) or not is_stale(
                    schedule=pair.schedule,
                    last_delivered_at=pair.last_delivered_at,
                    created_at=pair.created_at,
                    now=now,
                ):
                    continue
                alert_repo.set_state(
                    session, pair.audience_id, pair.destination_id, STALE, run_id=None, now=now
                )
                since = pair.last_delivered_at
                facts = AlertFacts(
                    event=AlertEvent.STALE.value,
                    audience=pair.audience_key,
                    destination=pair.destination,
                    status=STALE,
                    error=(
                        f"no successful run since {since.isoformat()}"
                        if since
                        else "no successful run since it was created "
                        f"({pair.created_at:%Y-%m-%d %H:%M} UTC)"
                    ),
                )
                pending.extend(self._queue(session, facts, now=now))
        return pending

    def _queue(self, session: Session, facts: AlertFacts, *, now: datetime) -> list[_Pending]:
        document = alert_document(facts, public_url=self._public_url)
        return [
            _Pending(
                alert_repo.record_alert(
                    session,
                    channel=channel.name,
                    event=facts.event,
                    audience_key=facts.audience,
                    destination=facts.destination,
                    run_id=facts.run_id,
                    now=now,
                ),
                channel.name,
                channel.url,
                document,
            )
            for channel in alert_repo.channels(session)
            if is_wanted(channel.events, channel.audience_keys, facts.event, facts.audience)
        ]

    # ------------------------------------------------------------- posting

    def _post_all(self, pending: Sequence[_Pending]) -> None:
        if not pending:
            return
        if not self._in_background:
            self._post_each(pending)
            return
        # Not a daemon: a CLI process finishes posting before it exits. The run's log
        # fields go along (the thread runs in a copy of this context).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(self._post_each, list(pending)),
            name="audience-sync-alerts",
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _post_each(self, pending: Iterable[_Pending]) -> None:
        for alert in pending:
            try:
                self._post(alert)
            except Exception:
                logger.exception(
                    "alert %s to %s could not be posted", alert.alert_id, alert.channel
                )

    def _post(self, alert: _Pending) -> PostOutcome:
        try:
            url = str(resolve_env(alert.url, self._env, f"alerts {alert.channel!r} url"))
        except ConfigError as exc:
            outcome = PostOutcome(False, 0, None, str(exc))
        else:
            outcome = self._poster.post(url, alert.document)
        with unit_of_work(self._sessions) as session:
            alert_repo.finish_alert(
                session,
                alert.alert_id,
                outcome="delivered" if outcome.is_delivered else "failed",
                attempts=outcome.attempts,
                response_status=outcome.status,
                error=outcome.error,
                now=self._clock(),
            )
        if not outcome.is_delivered:
            event = alert.document.get("audience_sync", {}).get("event", TEST_EVENT)
            logger.error(
                "alert %s (%s) to %r not delivered after %d attempt(s): %s",
                alert.alert_id,
                event,
                alert.channel,
                outcome.attempts,
                outcome.error,
            )
        return outcome
