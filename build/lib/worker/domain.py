"""The sync vocabulary: run statuses, modes and triggers, and the plain values the service
hands to its callers (the CLI, the Celery tasks) and between its own steps."""

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from worker.payloads import AudienceRef


class RunStatus(enum.StrEnum):
    """Where a run stands; stored as these strings in `sync_runs.status`."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    SKIPPED = "skipped"
    BLOCKED = "blocked"
    # Stopped at a page boundary: by SIGINT/SIGTERM or `runs cancel`; the rest is owed.
    CANCELLED = "cancelled"


class RunMode(enum.StrEnum):
    """What a run does; stored as these strings in `sync_runs.mode`."""

    INITIAL = "initial"
    INCREMENTAL = "incremental"
    FULL = "full"
    DRY_RUN = "dry_run"
    ARCHIVE = "archive"


class Trigger(enum.StrEnum):
    """Who asked for a run; stored as these strings in `sync_runs.trigger`."""

    MANUAL = "manual"
    SCHEDULE = "schedule"
    # A full run of the pair ended before it finished: this run completes it.
    FULL_OWED = "full_owed"


class AlertEvent(enum.StrEnum):
    """What an alert says happened to a pair (a change of its state, never a repeat)."""

    FAILED = "failed"
    BLOCKED = "blocked"
    PARTIAL = "partial"
    STALE = "stale"
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True)
class SyncRequest:
    is_full: bool = False
    is_dry_run: bool = False
    allow_mass_exit: bool = False
    retry_quarantined: bool = False
    trigger: Trigger = Trigger.MANUAL

    def __post_init__(self) -> None:
        # Requests cross Celery as JSON, where the trigger arrives as a plain string.
        try:
            trigger = Trigger(self.trigger)
        except ValueError:
            choices = ", ".join(t.value for t in Trigger)
            raise ValueError(f"unknown trigger {self.trigger!r} (one of {choices})") from None
        object.__setattr__(self, "trigger", trigger)


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int
    audience_key: str
    destination: str
    mode: str
    status: str
    members: int
    entered: int
    exited: int
    sent: int
    failed: int
    error: str | None
    duration_seconds: float


def summary_fields(summary: RunSummary) -> dict[str, object]:
    return {
        "run_id": summary.run_id,
        "audience": summary.audience_key,
        "destination": summary.destination,
        "mode": summary.mode,
        "status": summary.status,
        "members": summary.members,
        "entered": summary.entered,
        "exited": summary.exited,
        "sent": summary.sent,
        "failed": summary.failed,
        "error": summary.error,
        "duration_seconds": summary.duration_seconds,
    }


@dataclass(frozen=True, slots=True)
class PairScope:
    """What a run's diff compares: a snapshot of the audience against what one destination
    was last told (`is_full` re-sends every member)."""

    audience_id: int
    destination_id: int
    snapshot_id: int
    is_full: bool = False


@dataclass(frozen=True, slots=True)
class PreparedRun:
    """A run that passed its guards and is ready to deliver (plain values: it crosses into
    Celery chunk tasks)."""

    run_id: int
    pair_id: int
    audience: AudienceRef
    destination_id: int
    destination_name: str
    snapshot_id: int
    is_full: bool
    lock_owner: str
    to_enter: int
    to_exit: int
    # Where the time went before delivery (logged, and read by the benchmark).
    snapshot_seconds: float = 0.0
    diff_seconds: float = 0.0
    # Whether the pair had failing users when the run started (their rows go on success).
    has_failing_members: bool = True

    @property
    def scope(self) -> PairScope:
        return PairScope(self.audience.id, self.destination_id, self.snapshot_id, self.is_full)


@dataclass(frozen=True, slots=True)
class ChunkRange:
    """One fan-out chunk: the run's changes with member_id in (after, upto]."""

    after: str | None
    upto: str | None


@dataclass(frozen=True, slots=True)
class FanOut:
    """A started run too large for one worker: deliver each chunk, then close the run."""

    prepared: PreparedRun
    chunks: list[ChunkRange]


def chunk_ranges(boundaries: Sequence[str]) -> list[ChunkRange]:
    """Cut a run's changes at their chunk boundaries: (None, b0], (b0, b1], ...,
    (b_last, None). The last chunk is open-ended, so every change lands in exactly one."""
    edges: list[str | None] = [None, *boundaries, None]
    return [ChunkRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


@dataclass(slots=True)
class ApplyReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PairStatus:
    pair_id: int
    audience_key: str
    destination: str
    schedule: str
    last_run_id: int | None
    last_status: str | None
    last_started_at: datetime | None
    next_due_at: datetime
    is_running: bool
    # Who holds the pair: "running", "stale (...)", "running elsewhere (...)"; None if free.
    run_state: str | None = None
    # A full run of the pair ended before it finished; the next run is full.
    is_full_sync_owed: bool = False


class Progress(Protocol):
    def start(self, description: str, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...

    def stop(self) -> None: ...


class NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def stop(self) -> None:
        pass


MASS_EXIT_MINIMUM = 100  # the mass-exit guard ignores destinations holding fewer members


def mass_exit_reason(
    *,
    members: int,
    previous_members: int | None,
    held_members: int,
    exits: int,
    max_exit_fraction: float,
) -> str | None:
    """Why a run must not send its exits (None when it may).

    A source that suddenly returns nothing is almost always broken, and so is one that
    would remove more than `max_exit_fraction` of the members a destination holds.
    """
    if members == 0 and ((previous_members or 0) > 0 or held_members > 0):
        had = max(previous_members or 0, held_members)
        return (
            f"blocked: the source returned no rows where the audience had {had} members; "
            "check the source, or rerun with --allow-mass-exit if it is really empty"
        )
    if held_members >= MASS_EXIT_MINIMUM and exits > max_exit_fraction * held_members:
        return (
            f"blocked: {exits} of {held_members} members ({exits / held_members:.0%}) would "
            f"exit, over the limit of {max_exit_fraction:.0%}; rerun with --allow-mass-exit "
            "if this is intended"
        )
    return None
