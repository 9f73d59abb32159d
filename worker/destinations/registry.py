"""Building destination clients from their validated settings."""

from dataclasses import dataclass

from worker.destinations.base import Destination
from worker.destinations.file import FileDestination
from worker.destinations.settings import (
    DestinationSettings,
    FileSettings,
)
from worker.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Timeouts and retry bounds shared by the HTTP destinations (from Settings)."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0


def build_destination(
    name: str,
    settings: DestinationSettings,
    *,
    http: HttpOptions,
    limiter: RateLimiter | None,
) -> Destination:
    if isinstance(settings, FileSettings):
        return FileDestination(name, path=settings.path)
    raise NotImplementedError(f"destination type {settings.type!r} is not built yet")
