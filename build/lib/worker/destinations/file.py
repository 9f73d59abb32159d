"""The `file` destination: appends identify calls as NDJSON (the demo's default)."""

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.destinations.base import DestinationClient, Rejection
from worker.destinations.http import HttpOptions
from worker.destinations.settings import DestinationSettings
from worker.payloads import AudienceRef
from worker.ratelimit import RateLimiter


class FileSettings(DestinationSettings):
    path: str


class FileDestination(DestinationClient):
    max_batch_items = 5_000

    def __init__(
        self,
        name: str,
        *,
        settings: FileSettings,
        http: HttpOptions | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        # A file is neither reached over HTTP nor paced: `http` and `limiter` are accepted
        # only so that every client is built the same way (see `registry`).
        super().__init__(name)
        self.path = Path(settings.path)

    def deliver(self, audience: AudienceRef, calls: Sequence[dict[str, Any]]) -> list[Rejection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(call, separators=(",", ":")) + "\n" for call in calls)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(data)
            handle.flush()
            # Accepted means durable: the synced state moves only after this returns.
            os.fsync(handle.fileno())
        return []

    def check(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return f"writes to {self.path}"
