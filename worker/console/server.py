"""Running the console: a read-only engine on the state database, the app, uvicorn."""

import uvicorn
from starlette.applications import Starlette

from worker.console.app import check_bind, create_app
from worker.console.readonly import read_only_engine, read_only_sessions
from worker.context import utcnow
from worker.metrics import registry_for
from worker.reports import ReportService
from worker.settings import Settings


def console_token(settings: Settings) -> str | None:
    token = settings.console_token
    return token.get_secret_value() if token is not None and token.get_secret_value() else None


def build_console(settings: Settings) -> Starlette:
    """The console app on its own read-only connection to the state database."""
    engine = read_only_engine(settings.database_url)
    reports = ReportService(session_factory=read_only_sessions(engine))
    return create_app(
        reports,
        registry=registry_for(reports),
        clock=utcnow,
        token=console_token(settings),
        is_secure_cookie=(settings.public_url or "").startswith("https://"),
    )


def run_console(settings: Settings, *, host: str, port: int) -> None:
    """Serve the console until interrupted; refuses a bind beyond this machine without a
    token (ConfigError)."""
    check_bind(host, console_token(settings))
    uvicorn.run(build_console(settings), host=host, port=port, log_level="info")
