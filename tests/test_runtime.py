"""The per-process wiring: what `build_runtime` hands each part."""

from pathlib import Path

import pytest

from worker.destinations.ortto import OrttoDestination
from worker.runtime import build_runtime
from worker.settings import Settings

KEY_VAR = "RUNTIME_TEST_ORTTO_KEY"
ORTTO = {"type": "ortto", "api_key": f"${{{KEY_VAR}}}", "endpoint": "http://127.0.0.1:9"}


def test_the_env_given_resolves_destinations_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The variable is in the env given, not in the process environment: a destination
    # resolved from os.environ would fail on it.
    monkeypatch.delenv(KEY_VAR, raising=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}")
    runtime = build_runtime(settings, env={KEY_VAR: "pau-runtime-test-key-0123456789"})
    try:
        client = runtime.destinations.get("o", ORTTO)
        assert isinstance(client, OrttoDestination)
        assert client.settings.api_key.get_secret_value() == "pau-runtime-test-key-0123456789"
    finally:
        runtime.close()
