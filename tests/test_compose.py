"""docker-compose.yml and the Dockerfile, read as data: services, healthchecks, commands,
start order and required secrets (no container engine needed)."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
# What compose interpolates: everything but the comments.
COMPOSE_VALUES = "\n".join(
    line for line in COMPOSE_TEXT.splitlines() if not line.lstrip().startswith("#")
)
SERVICES: dict[str, Any] = COMPOSE["services"]
APP_SERVICES = ("migrate", "apply", "worker", "beat", "flower", "console")
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _command(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return command.split() if isinstance(command, str) else list(command)


def _conditions(service: str) -> dict[str, str]:
    return {name: dep["condition"] for name, dep in SERVICES[service]["depends_on"].items()}


def test_services() -> None:
    assert set(SERVICES) == {"postgres", "redis", *APP_SERVICES}


@pytest.mark.parametrize(
    ("service", "probe"), [("postgres", "pg_isready"), ("redis", "redis-cli ping")]
)
def test_backing_services_have_healthchecks(service: str, probe: str) -> None:
    check = SERVICES[service]["healthcheck"]
    assert probe in " ".join(check["test"])
    assert check["retries"] >= 3


@pytest.mark.parametrize(
    ("service", "command"),
    [
        ("migrate", ["audience-sync", "db", "upgrade"]),
        ("apply", ["audience-sync", "apply", "/config/audiences.yml"]),
        ("worker", ["celery", "-A", "worker", "worker"]),
        ("beat", ["celery", "-A", "worker", "beat"]),
        ("flower", ["celery", "-A", "worker", "flower"]),
        ("console", ["audience-sync", "console", "--host", "0.0.0.0", "--port", "8080"]),
    ],
)
def test_commands(service: str, command: list[str]) -> None:
    assert _command(service)[: len(command)] == command


def test_workers_log_the_end_of_run_lines() -> None:
    # The service logs each run's summary at INFO; Celery's default level would hide it.
    for service in ("worker", "beat"):
        assert _command(service)[_command(service).index("--loglevel") + 1] == "INFO"


def test_one_shot_services_do_not_restart() -> None:
    for service in ("migrate", "apply"):
        assert SERVICES[service]["restart"] == "no"
    for service in ("postgres", "redis", "worker", "beat", "flower", "console"):
        assert SERVICES[service]["restart"] == "unless-stopped"


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("migrate", {"postgres": "service_healthy"}),
        ("apply", {"migrate": "service_completed_successfully"}),
        (
            "worker",
            {
                "postgres": "service_healthy",
                "redis": "service_healthy",
                "migrate": "service_completed_successfully",
            },
        ),
        (
            "beat",
            {
                "postgres": "service_healthy",
                "redis": "service_healthy",
                "migrate": "service_completed_successfully",
            },
        ),
        ("flower", {"redis": "service_healthy"}),
        (
            "console",
            {"postgres": "service_healthy", "migrate": "service_completed_successfully"},
        ),
    ],
)
def test_start_order(service: str, expected: dict[str, str]) -> None:
    assert _conditions(service) == expected


def test_app_services_share_settings_and_the_audiences_file() -> None:
    for service in APP_SERVICES:
        spec = SERVICES[service]
        env = spec["environment"]
        assert env["AUDIENCE_SYNC_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["AUDIENCE_SYNC_DATABASE_URL"]
        assert env["AUDIENCE_SYNC_REDIS_URL"] == "redis://redis:6379/0"
        assert "./audiences.yml:/config/audiences.yml:ro" in spec["volumes"]
        assert spec["build"] == "."


def test_secrets_are_required_from_the_environment() -> None:
    references = _INTERPOLATION.findall(COMPOSE_VALUES)
    assert references, "the compose file reads its secrets from the environment"
    for reference in references:
        name, separator, message = reference.partition(":?")
        # `${VAR:?why}`: compose refuses to start without it; never a default value.
        assert separator and message.strip(), f"${{{reference}}} must be ${{VAR:?message}}"
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name)
    names = {r.partition(":?")[0] for r in references}
    assert {
        "POSTGRES_PASSWORD",
        "SHOP_DATABASE_URL",
        "ORTTO_API_KEY",
        "AUDIENCE_SYNC_CONSOLE_TOKEN",
    } <= names
    assert "${POSTGRES_PASSWORD:?" in SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_no_secret_written_in_the_file() -> None:
    for service in SERVICES.values():
        for name, value in (service.get("environment") or {}).items():
            if any(word in name for word in ("PASSWORD", "KEY", "SECRET", "TOKEN")):
                assert str(value).startswith("${") and ":?" in str(value), name


def test_flower_is_published_on_this_machine_only() -> None:
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]


def test_console_is_published_on_this_machine_only_and_requires_its_token() -> None:
    console = SERVICES["console"]
    assert console["ports"] == ["127.0.0.1:8080:8080"]
    # It binds every interface of its container: the token is required, from the environment.
    assert console["environment"]["AUDIENCE_SYNC_CONSOLE_TOKEN"].startswith(
        "${AUDIENCE_SYNC_CONSOLE_TOKEN:?"
    )
    # The other services never see the token.
    for name in APP_SERVICES:
        if name != "console":
            assert "AUDIENCE_SYNC_CONSOLE_TOKEN" not in SERVICES[name]["environment"]


def test_state_survives_restarts() -> None:
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "--appendonly" in _command("redis")
    assert set(COMPOSE["volumes"]) == {"postgres-data", "redis-data"}


def test_dockerfile_builds_the_project_with_pip() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("RUN pip install") and "[flower]" in line for line in lines)
    for package in ("worker", "models", "migrations"):
        assert any(line.startswith(f"COPY {package} ") for line in lines)
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
