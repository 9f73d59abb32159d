"""The crash-point hook: the service calls it at each named step of a run. It does nothing
in production; the guarantee tests build one that SIGKILLs the process at a chosen step."""

import os
import signal
from collections.abc import Callable

from worker.errors import ConfigError

CrashPoint = Callable[[str], None]

# The steps of a run where the hook is called, in the order a run reaches them.
STEPS = (
    "after_lock",
    "reading_source",
    "writing_snapshot",
    "before_delivery",
    "page_sent",
    "page_recorded",
)


def no_crash(_step: str) -> None:
    """The default hook: runs go on."""


def kill_at(spec: str | None) -> CrashPoint:
    """The hook for `step` or `step@N`: SIGKILL this process the Nth time the run reaches
    `step` (the first time without `@N`). No spec: the no-op hook."""
    if not spec:
        return no_crash
    name, _, nth = spec.partition("@")
    if name not in STEPS:
        raise ConfigError(f"unknown crash step {name!r} (one of {', '.join(STEPS)})")
    if nth and not (nth.isdigit() and int(nth) >= 1):
        raise ConfigError(f"crash step {spec!r}: the count after @ must be a positive integer")
    wanted = int(nth or 1)
    reached = 0

    def crash_point(step: str) -> None:
        nonlocal reached
        if step != name:
            return
        reached += 1
        if reached >= wanted:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_point
