"""Destination clients, built once per process from stored settings and reused."""

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from worker.destinations.base import DestinationClient
from worker.destinations.registry import HttpOptions, build_client, resolve_settings
from worker.destinations.settings import HttpDestinationSettings
from worker.ratelimit import LocalRateLimiter, RateLimit, RateLimiter
from worker.settings import Settings

LimiterFactory = Callable[[str, RateLimit], RateLimiter]


def local_limiter(_name: str, limit: RateLimit) -> RateLimiter:
    return LocalRateLimiter(limit)


def http_options(settings: Settings) -> HttpOptions:
    return HttpOptions(
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        max_attempts=settings.max_attempts,
        backoff_base=settings.backoff_base_seconds,
        backoff_max=settings.backoff_max_seconds,
    )


class DestinationPool:
    """Keeps one client per destination (and settings) so HTTP connections are reused."""

    def __init__(
        self,
        *,
        http: HttpOptions,
        limiter_factory: LimiterFactory = local_limiter,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._http = http
        self._limiter_factory = limiter_factory
        self._env = env
        self._clients: dict[tuple[str, str], DestinationClient] = {}

    def get(self, name: str, template: Mapping[str, Any]) -> DestinationClient:
        """The client for a destination. Its settings are resolved (`${VAR}` references from
        the env) and validated when the client is built; later calls with the same stored
        template get the same client."""
        cache_key = (name, json.dumps(template, sort_keys=True))
        client = self._clients.get(cache_key)
        if client is None:
            settings = resolve_settings(
                name, template, os.environ if self._env is None else self._env
            )
            limiter = (
                self._limiter_factory(name, settings.rate_limit)
                if isinstance(settings, HttpDestinationSettings)
                else None
            )
            client = build_client(name, settings, http=self._http, limiter=limiter)
            self._clients[cache_key] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
