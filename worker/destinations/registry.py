"""Building destination clients from their validated settings."""

from worker.destinations.base import Destination
from worker.destinations.file import FileDestination
from worker.destinations.http import HttpOptions
from worker.destinations.ortto import OrttoDestination
from worker.destinations.ortto_api import OrttoApiDestination
from worker.destinations.segment import SegmentDestination
from worker.destinations.settings import (
    DestinationSettings,
    FileSettings,
    OrttoApiSettings,
    OrttoSettings,
    SegmentSettings,
)
from worker.ratelimit import RateLimiter

__all__ = ["HttpOptions", "build_destination"]


def build_destination(
    name: str,
    settings: DestinationSettings,
    *,
    http: HttpOptions,
    limiter: RateLimiter | None,
) -> Destination:
    """The client for one destination. `limiter` is the pacing shared across processes; with
    None, an HTTP destination paces itself within this process by its `rate_limit`."""
    if isinstance(settings, FileSettings):
        return FileDestination(name, path=settings.path)
    if isinstance(settings, OrttoSettings):
        return OrttoDestination(name, settings=settings, http=http, limiter=limiter)
    if isinstance(settings, OrttoApiSettings):
        return OrttoApiDestination(name, settings=settings, http=http, limiter=limiter)
    if isinstance(settings, SegmentSettings):
        return SegmentDestination(name, settings=settings, http=http, limiter=limiter)
    raise NotImplementedError(f"destination type {settings.type!r} is not built")
