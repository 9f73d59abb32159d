"""Log lines: plain text, or one JSON object per line (`AUDIENCE_SYNC_LOG_FORMAT=json`);
either way every line logged while a run is under way carries its run id, audience and
destination (bound when the run opens, in this thread or task)."""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(levelname)s %(name)s %(message)s"
RUN_FIELDS = ("run_id", "audience", "destination")

_run: ContextVar[dict[str, Any] | None] = ContextVar("audience_sync_run", default=None)


def bind_run(run_id: int, audience: str, destination: str) -> None:
    """From now on (in this context), log lines carry this run."""
    _run.set({"run_id": run_id, "audience": audience, "destination": destination})


def unbind_run() -> None:
    _run.set(None)


@contextmanager
def run_scope() -> Iterator[None]:
    """Whatever run is bound inside the block is forgotten after it (a Celery task)."""
    token = _run.set(_run.get())
    try:
        yield
    finally:
        _run.reset(token)


def current_run() -> dict[str, Any] | None:
    return _run.get()


class RunContextFilter(logging.Filter):
    """Copies the bound run onto each record (None outside a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _run.get() or {}
        for name in RUN_FIELDS:
            setattr(record, name, bound.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the run's fields, and the
    traceback of an exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _run.get() or {}
        for name in RUN_FIELDS:
            document[name] = getattr(record, name, None) or bound.get(name)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with `[run N audience -> destination]` on lines of a run."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        bound = _run.get()
        if bound is None:
            return line
        return f"{line} [run {bound['run_id']} {bound['audience']} -> {bound['destination']}]"


def formatter_for(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def apply_format(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of `logger` the format and the run's fields."""
    for handler in logger.handlers:
        handler.setFormatter(formatter_for(log_format))
        if not any(isinstance(f, RunContextFilter) for f in handler.filters):
            handler.addFilter(RunContextFilter())


def configure(log_format: str, *, level: int = logging.WARNING) -> None:
    """The process's logging: one stderr handler on the root logger."""
    logging.basicConfig(level=level, format=TEXT_FORMAT)
    apply_format(logging.getLogger(), log_format)
