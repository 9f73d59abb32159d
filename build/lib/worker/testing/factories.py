"""Plain factory functions for test configurations and for reading what destinations got."""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from worker.config import load_config
from worker.domain import RunSummary, SyncRequest
from worker.runtime import Runtime


def audience(
    name: str, flag: str, destinations: Sequence[str] = ("local",), **extra: Any
) -> dict[str, Any]:
    """An audience selecting the people whose flag column is 1."""
    return {
        "name": name,
        "source": "shop",
        "query": f"select user_id, email from people where {flag} = 1",
        "destinations": list(destinations),
        **extra,
    }


def write_config(
    directory: Path,
    *,
    source_url: str,
    audiences: Iterable[dict[str, Any]],
    destinations: dict[str, dict[str, Any]] | None = None,
    name: str = "audiences.yml",
) -> Path:
    """Write an audiences file; the default destination `local` is an NDJSON file."""
    destinations = destinations or {
        "local": {"type": "file", "path": str(directory / "identify.ndjson")}
    }
    path = directory / name
    path.write_text(
        yaml.safe_dump(
            {
                "sources": {"shop": {"url": source_url}},
                "destinations": destinations,
                "audiences": list(audiences),
            },
            sort_keys=False,
        )
    )
    return path


def apply_file(runtime: Runtime, path: Path, *, check_queries: bool = True) -> None:
    runtime.service.apply(load_config(path), check_queries=check_queries)


def sync_all(
    runtime: Runtime, request: SyncRequest | None = None, **select: Any
) -> list[RunSummary]:
    service = runtime.service
    return [service.sync_pair(p, request or SyncRequest()) for p in service.select_pairs(**select)]


def read_calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def destination_state(calls: Iterable[dict[str, Any]], key: str) -> dict[str, bool]:
    """The value of `key` each user holds after the calls, in order."""
    state: dict[str, bool] = {}
    for call in calls:
        if key in call["traits"]:
            state[call["userId"] or call["anonymousId"]] = call["traits"][key]
    return state
