"""The read side: what the CLI (and later a console) shows of the state database, as plain
frozen values; no ORM object leaves this module."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import TypedDict

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.sync import FailingMember, SyncRun
from worker.errors import NotFoundError
from worker.repositories import alerts as alert_repo
from worker.repositories import audiences as audience_repo
from worker.repositories import failures as failure_repo
from worker.repositories import monitoring as monitoring_repo
from worker.repositories import runs as run_repo
from worker.repositories import snapshots as snapshot_repo
from worker.repositories import synced as synced_repo
from worker.repositories.synced import SyncedState
from worker.scheduling import next_due, parse_schedule


class RunOutcomeFields(TypedDict):
    """The fields a run's record (`history`, `runs show`) and its summary (what `sync`
    prints, the `sync finished` log line) both copy from the stored run."""

    mode: str
    status: str
    members: int
    entered: int
    exited: int
    sent: int
    failed: int
    error: str | None


def run_outcome_fields(run: SyncRun) -> RunOutcomeFields:
    return RunOutcomeFields(
        mode=run.mode,
        status=run.status,
        members=run.members,
        entered=run.entered,
        exited=run.exited,
        sent=run.sent,
        failed=run.failed,
        error=run.error,
    )


@dataclass(frozen=True, slots=True)
class AudienceListing:
    """One audience as `audiences list` shows it."""

    key: str
    name: str
    source: str
    schedule: str
    destinations: tuple[str, ...]  # the enabled ones, in the order they were linked
    is_archived: bool


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run of the history, with the names of its audience and destination."""

    id: int
    audience: str
    destination: str
    mode: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    members: int
    entered: int
    exited: int
    sent: int
    failed: int
    skipped_rows: Mapping[str, int]  # reason -> count
    error: str | None
    duration_seconds: float | None  # None while the run has not finished
    # Where the run ran: host, process id, Celery task id (None: not in a Celery worker).
    host: str | None = None
    pid: int | None = None
    task_id: str | None = None
    # Timings per phase (None: the run did not reach the phase, or predates their record).
    snapshot_seconds: float | None = None
    diff_seconds: float | None = None
    delivery_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RunFailure:
    """One user's rejected call in a run."""

    user: str
    value: bool
    status: int | None
    message: str


# `runs show` lists at most this many of a run's failures (the first ones); it says so.
RUN_FAILURES_SHOWN = 1000


@dataclass(frozen=True, slots=True)
class RunDetail:
    run: RunRecord
    failures: tuple[RunFailure, ...]  # the first RUN_FAILURES_SHOWN of them
    failures_total: int  # all of the run's failures, shown or not

    @property
    def failures_truncated(self) -> bool:
        return self.failures_total > len(self.failures)


@dataclass(frozen=True, slots=True)
class FailingUser:
    """A user whose latest delivery to a destination was rejected."""

    audience: str
    destination: str
    user: str
    value: bool
    rejections: int  # in a row
    is_quarantined: bool
    last_status: int | None
    last_message: str
    last_run_id: int


@dataclass(frozen=True, slots=True)
class DestinationStanding:
    """Where one user stands at one destination of an audience."""

    destination: str
    accepted_value: bool | None  # the last value the destination accepted (None: never told)
    accepted_run_id: int | None
    accepted_at: datetime | None
    owed_value: bool | None  # what the next run sends the user (None: nothing owed)
    is_in_doubt: bool  # a stopped run may have told it something unrecorded
    is_failing: bool  # its latest call was rejected
    is_quarantined: bool
    rejections: int  # in a row
    last_message: str | None


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """The user entered (True) or exited (False) the audience, seen by a snapshot then."""

    at: datetime
    is_member: bool


@dataclass(frozen=True, slots=True)
class AudienceStanding:
    """Where one user stands in one audience: its latest snapshot, each destination, and
    the entries and exits over the kept history."""

    audience: str
    is_member: bool | None  # in the latest snapshot (None: no snapshot yet)
    snapshot_at: datetime | None
    destinations: tuple[DestinationStanding, ...]
    history: tuple[MembershipChange, ...]


@dataclass(frozen=True, slots=True)
class PairMetrics:
    """One pair's figures for the metrics, from the run history."""

    audience: str
    destination: str
    last_success_at: datetime | None  # the end of its last succeeded or partial run
    last_status: str | None
    last_duration_seconds: float | None
    runs: Mapping[str, int]  # status -> runs
    calls_sent: int
    calls_failed: int
    quarantined: int
    owed: int  # failing users not quarantined, and users in doubt: still to be sent
    # The latest run's timings per phase (None: not reached, or not finished).
    last_phase_seconds: Mapping[str, float | None] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True, slots=True)
class MetricsReport:
    pairs: tuple[PairMetrics, ...]
    members: Mapping[str, int]  # audience key -> members at its latest delivered run


@dataclass(frozen=True, slots=True)
class PairOverview:
    """One pair as the console's overview shows it."""

    audience: str
    audience_name: str
    destination: str
    schedule: str
    status: str | None  # of the latest run (None: never ran)
    last_run_id: int | None
    last_started_at: datetime | None
    next_due_at: datetime
    members: int
    owed: int
    quarantined: int
    member_series: tuple[int, ...]  # members at the latest delivered runs, oldest first


@dataclass(frozen=True, slots=True)
class AudienceDetail:
    key: str
    name: str
    source: str
    query: str | None  # None: a rule audience (its SQL is compiled from its rules)
    schedule: str
    destinations: tuple[str, ...]
    max_exit_fraction: float
    is_archived: bool
    runs: tuple[RunRecord, ...]  # newest first


@dataclass(frozen=True, slots=True)
class RunPage:
    """A run with one page of its per-user failures."""

    run: RunRecord
    failures: tuple[RunFailure, ...]
    total_failures: int
    page: int
    pages: int


@dataclass(frozen=True, slots=True)
class FailingPage:
    """One page of the failing users."""

    users: tuple["FailingUser", ...]
    total: int
    page: int
    pages: int


@dataclass(frozen=True, slots=True)
class Health:
    is_healthy: bool
    reason: str | None
    dispatcher_at: datetime | None


class ReportService:
    """Read-only questions about audiences, runs and failures; one session per question,
    never a write. An audience key or run id that does not exist raises NotFoundError."""

    def __init__(self, *, session_factory: sessionmaker[Session]) -> None:
        self._sessions = session_factory

    def audiences(self) -> list[AudienceListing]:
        """Every audience (archived ones too), by key."""
        with self._sessions() as session:
            names = {d.id: d.name for d in audience_repo.destinations_by_name(session).values()}
            return [
                AudienceListing(
                    key=audience.key,
                    name=audience.name,
                    source=audience.source.name,
                    schedule=audience.schedule,
                    destinations=tuple(
                        names[link.destination_id] for link in audience.links if link.is_enabled
                    ),
                    is_archived=audience.is_archived,
                )
                for audience in audience_repo.all_audiences(session)
            ]

    def history(self, *, audience_key: str | None = None, limit: int = 20) -> list[RunRecord]:
        """The latest `limit` runs, newest first (of one audience, if given)."""
        with self._sessions() as session:
            _check_audience(session, audience_key)
            rows = run_repo.history(session, audience_key=audience_key, limit=limit)
            return [_record(run, key, name) for run, key, name in rows]

    def run(self, run_id: int, *, failures_limit: int = RUN_FAILURES_SHOWN) -> RunDetail:
        """One run with its first `failures_limit` per-user failures and their total."""
        with self._sessions() as session:
            run = run_repo.get_run(session, run_id)
            if run is None:
                raise NotFoundError(f"no run {run_id}; `audience-sync history` shows them")
            key, name = audience_repo.names_of_pair(session, run.audience_id, run.destination_id)
            failures = tuple(
                RunFailure(user=f.member_id, value=f.value, status=f.status, message=f.message)
                for f in failure_repo.failures_of_run(session, run_id, limit=failures_limit)
            )
            total = failure_repo.count_failures_of_run(session, run_id)
            return RunDetail(_record(run, key, name), failures, total)

    def metrics(self) -> MetricsReport:
        """Every active pair's figures, from the run history and the failing users."""
        with self._sessions() as session:
            counts = monitoring_repo.run_counts(session)
            delivered = monitoring_repo.last_delivered(session)
            latest = monitoring_repo.latest_runs(session)
            failing = monitoring_repo.failing_counts(session)
            members = monitoring_repo.members_by_audience(session)
            by_pair: dict[tuple[int, int], dict[str, tuple[int, int, int]]] = {}
            for (a, d, status), figures in counts.items():
                by_pair.setdefault((a, d), {})[status] = figures
            pairs = []
            keys = {}
            for a, d, key, name, _schedule in monitoring_repo.active_pairs(session):
                keys[a] = key
                statuses = by_pair.get((a, d), {})
                run = latest.get((a, d))
                pairs.append(
                    PairMetrics(
                        audience=key,
                        destination=name,
                        last_success_at=delivered.get((a, d)),
                        last_status=run.status if run else None,
                        last_duration_seconds=_duration(run) if run else None,
                        runs=MappingProxyType({s: n for s, (n, _, _) in statuses.items()}),
                        calls_sent=sum(sent for _, sent, _ in statuses.values()),
                        calls_failed=sum(failed for _, _, failed in statuses.values()),
                        quarantined=failing.get((a, d, True), 0),
                        owed=failing.get((a, d, False), 0),
                        last_phase_seconds=_phases(run) if run else MappingProxyType({}),
                    )
                )
            return MetricsReport(
                tuple(pairs),
                MappingProxyType({keys[a]: n for a, n in members.items() if a in keys}),
            )

    def overview(self, *, now: datetime, series_length: int = 20) -> list[PairOverview]:
        """Every active pair: its latest run, next due time, members, owed users and the
        members of its latest delivered runs."""
        with self._sessions() as session:
            latest = monitoring_repo.latest_runs(session)
            failing = monitoring_repo.failing_counts(session)
            series = monitoring_repo.member_series(session, per_pair=series_length)
            names = {a.id: a.name for a in audience_repo.all_audiences(session)}
            rows = []
            for a, d, key, destination, schedule in monitoring_repo.active_pairs(session):
                run = latest.get((a, d))
                points = series.get((a, d), [])
                rows.append(
                    PairOverview(
                        audience=key,
                        audience_name=names.get(a, key),
                        destination=destination,
                        schedule=schedule,
                        status=run.status if run else None,
                        last_run_id=run.id if run else None,
                        last_started_at=run.started_at if run else None,
                        next_due_at=next_due(
                            parse_schedule(schedule), run.started_at if run else None, now=now
                        ),
                        members=points[-1] if points else 0,
                        owed=failing.get((a, d, False), 0),
                        quarantined=failing.get((a, d, True), 0),
                        member_series=tuple(points),
                    )
                )
            return rows

    def audience(self, key: str, *, runs: int = 50) -> AudienceDetail:
        """One audience's definition and its latest runs (newest first)."""
        with self._sessions() as session:
            found = audience_repo.audience_by_key(session, key)
            if found is None:
                raise NotFoundError(f"no audience with key {key!r}")
            names = {d.id: d.name for d in audience_repo.destinations_by_name(session).values()}
            history = monitoring_repo.runs_of_audience(session, found.id, limit=runs)
            return AudienceDetail(
                key=found.key,
                name=found.name,
                source=found.source.name,
                query=found.query,
                schedule=found.schedule,
                destinations=tuple(
                    names[link.destination_id] for link in found.links if link.is_enabled
                ),
                max_exit_fraction=found.max_exit_fraction,
                is_archived=found.is_archived,
                runs=tuple(_record(run, found.key, name) for run, name in history),
            )

    def run_page(self, run_id: int, *, page: int = 1, per_page: int = 50) -> RunPage:
        """One run with one page (from 1) of its per-user failures."""
        with self._sessions() as session:
            run = run_repo.get_run(session, run_id)
            if run is None:
                raise NotFoundError(f"no run {run_id}")
            key, name = audience_repo.names_of_pair(session, run.audience_id, run.destination_id)
            page = max(page, 1)
            rows, total = monitoring_repo.failures_page(
                session, run_id, offset=(page - 1) * per_page, limit=per_page
            )
            return RunPage(
                run=_record(run, key, name),
                failures=tuple(
                    RunFailure(user=f.member_id, value=f.value, status=f.status, message=f.message)
                    for f in rows
                ),
                total_failures=total,
                page=page,
                pages=max(1, -(-total // per_page)),
            )

    def failing_page(self, *, page: int = 1, per_page: int = 500) -> FailingPage:
        """One page (from 1) of every failing user, quarantined or not, by audience,
        destination and user."""
        with self._sessions() as session:
            page = max(page, 1)
            rows, total = monitoring_repo.failing_page(
                session, offset=(page - 1) * per_page, limit=per_page
            )
            return FailingPage(
                users=tuple(_failing_user(member, key, name) for member, key, name in rows),
                total=total,
                page=page,
                pages=max(1, -(-total // per_page)),
            )

    def health(self, *, now: datetime, dispatcher_within: timedelta) -> Health:
        """Whether the state database answers and beat's dispatcher ticked lately."""
        try:
            with self._sessions() as session:
                monitoring_repo.ping(session)
                ticked = alert_repo.last_beat(session, alert_repo.DISPATCHER)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            return Health(False, f"state database: {reason[0] if reason else 'error'}", None)
        if ticked is None:
            return Health(False, "beat's dispatcher has never run", None)
        if now - ticked > dispatcher_within:
            return Health(False, f"beat's dispatcher last ran at {ticked.isoformat()}", ticked)
        return Health(True, None, ticked)

    def failing_users(
        self, *, audience_key: str | None = None, only_quarantined: bool = True
    ) -> list[FailingUser]:
        """Users whose latest delivery was rejected (only the quarantined ones by default),
        by audience, destination and user."""
        with self._sessions() as session:
            _check_audience(session, audience_key)
            rows = failure_repo.failing_members(
                session, audience_key=audience_key, only_quarantined=only_quarantined
            )
            return [
                FailingUser(
                    audience=key,
                    destination=name,
                    user=member.member_id,
                    value=member.last_value,
                    rejections=member.consecutive_failures,
                    is_quarantined=member.is_quarantined,
                    last_status=member.last_status,
                    last_message=member.last_message,
                    last_run_id=member.last_run_id,
                )
                for member, key, name in rows
            ]

    def explain(self, user_id: str, *, audience_key: str | None = None) -> list[AudienceStanding]:
        """Why a user holds the value it holds: for each audience (or the one named) and
        each of its destinations, membership, the value accepted and by which run, what is
        owed, doubts, failures and quarantine, and the user's entries and exits."""
        with self._sessions() as session:
            _check_audience(session, audience_key)
            found = audience_repo.pairs(
                session,
                audience_keys=None if audience_key is None else [audience_key],
                include_archived=True,
            )
            by_audience: dict[int, list[tuple[int, str]]] = {}
            keys: dict[int, str] = {}
            for pair in found:
                keys[pair.audience_id] = pair.audience.key
                by_audience.setdefault(pair.audience_id, []).append(
                    (pair.destination_id, pair.destination.name)
                )
            # A fixed number of statements whatever the number of audiences: each reads
            # every pair at once through a key that starts with audience_id and ends with
            # member_id, so the console's user page stays fast with many audiences.
            audience_ids = list(by_audience)
            latest = snapshot_repo.latest_snapshots(session, audience_ids)
            current = snapshot_repo.current_entries(session, audience_ids, user_id)
            synced = synced_repo.member_states(session, audience_ids, user_id)
            failing = failure_repo.failing_member_of_pairs(session, audience_ids, user_id)
            histories = snapshot_repo.member_histories(session, audience_ids, user_id, current)
            return [
                _standing(
                    keys[audience_id],
                    destinations,
                    latest=latest.get(audience_id),
                    is_member=audience_id in current,
                    synced={
                        d: synced[(audience_id, d)]
                        for d, _ in destinations
                        if (audience_id, d) in synced
                    },
                    failing={
                        d: failing[(audience_id, d)]
                        for d, _ in destinations
                        if (audience_id, d) in failing
                    },
                    history=histories.get(audience_id, []),
                )
                for audience_id, destinations in by_audience.items()
            ]


def _standing(
    key: str,
    destinations: list[tuple[int, str]],
    *,
    latest: tuple[int, datetime] | None,
    is_member: bool,
    synced: Mapping[int, SyncedState],
    failing: Mapping[int, FailingMember],
    history: list[tuple[datetime, bool]],
) -> AudienceStanding:
    """One audience's standing from what `explain` read for all of them; `synced` and
    `failing` are keyed by destination id. Membership is unknown before a first snapshot."""
    member = None if latest is None else is_member
    standings = []
    for destination_id, name in destinations:
        state = synced.get(destination_id)
        failure = failing.get(destination_id)
        accepted = None if state is None else state.is_member
        in_doubt = failure is not None and failure.consecutive_failures == 0
        standings.append(
            DestinationStanding(
                destination=name,
                accepted_value=accepted,
                accepted_run_id=None if state is None else state.run_id,
                accepted_at=None if state is None else state.updated_at,
                owed_value=owed_value(member, accepted, is_in_doubt=in_doubt),
                is_in_doubt=in_doubt,
                is_failing=failure is not None and failure.consecutive_failures > 0,
                is_quarantined=failure is not None and failure.is_quarantined,
                rejections=0 if failure is None else failure.consecutive_failures,
                last_message=None if failure is None else failure.last_message,
            )
        )
    return AudienceStanding(
        audience=key,
        is_member=member,
        snapshot_at=None if latest is None else latest[1],
        destinations=tuple(standings),
        history=tuple(MembershipChange(at, entered) for at, entered in history),
    )


def owed_value(is_member: bool | None, accepted: bool | None, *, is_in_doubt: bool) -> bool | None:
    """What the pair's next run sends the user: its membership when the destination holds
    something else (or may, being in doubt); None when nothing is owed or no snapshot says."""
    if is_member is None:
        return None
    if is_in_doubt:
        return is_member
    if is_member:
        return None if accepted is True else True
    # A non-member the destination never held as a member is owed nothing.
    return False if accepted is True else None


def _failing_user(member: FailingMember, key: str, name: str) -> FailingUser:
    return FailingUser(
        audience=key,
        destination=name,
        user=member.member_id,
        value=member.last_value,
        rejections=member.consecutive_failures,
        is_quarantined=member.is_quarantined,
        last_status=member.last_status,
        last_message=member.last_message,
        last_run_id=member.last_run_id,
    )


def _duration(run: SyncRun) -> float | None:
    if run.finished_at is None:
        return None
    return (run.finished_at - run.started_at).total_seconds()


def _phases(run: SyncRun) -> Mapping[str, float | None]:
    """A run's timings per phase, by the `phase` label the metrics give them."""
    return MappingProxyType(
        {
            "snapshot": run.snapshot_seconds,
            "diff": run.diff_seconds,
            "delivery": run.delivery_seconds,
        }
    )


def _check_audience(session: Session, audience_key: str | None) -> None:
    if audience_key is not None and audience_repo.audience_by_key(session, audience_key) is None:
        raise NotFoundError(
            f"no audience with key {audience_key!r}; `audience-sync audiences list` shows them"
        )


def _record(run: SyncRun, audience_key: str, destination_name: str) -> RunRecord:
    return RunRecord(
        id=run.id,
        audience=audience_key,
        destination=destination_name,
        trigger=run.trigger,
        started_at=run.started_at,
        finished_at=run.finished_at,
        # Read-only: a frozen record should not hand out a dict its reader could change.
        skipped_rows=MappingProxyType(dict(run.skipped_rows or {})),
        **run_outcome_fields(run),
        duration_seconds=(
            (run.finished_at - run.started_at).total_seconds()
            if run.finished_at is not None
            else None
        ),
        host=run.host,
        pid=run.pid,
        task_id=run.task_id,
        snapshot_seconds=run.snapshot_seconds,
        diff_seconds=run.diff_seconds,
        delivery_seconds=run.delivery_seconds,
    )
