"""`${VAR}` references in configuration values: finding them and resolving them from an env."""

import re
from collections.abc import Mapping
from typing import Any

from worker.errors import ConfigError

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def has_env_ref(text: str) -> bool:
    """Whether `text` holds at least one `${VAR}` reference."""
    return ENV_REF.search(text) is not None


def resolve_env(value: Any, env: Mapping[str, str], where: str) -> Any:
    """Replace `${VAR}` in every string of `value` (recursively) from `env`."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            resolved = env.get(name)
            if not resolved:
                raise ConfigError(
                    f"environment variable {name} is not set (used by {where}): export it "
                    "before running audience-sync"
                )
            return resolved

        return ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: resolve_env(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value
