"""The console's Starlette application: routes, the token check and the page renderer.
Pages read only through `ReportService`; every value is escaped by the templates."""

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from worker.console import svg
from worker.domain import RunStatus
from worker.errors import ConfigError, NotFoundError
from worker.metrics import exposition
from worker.reports import AudienceStanding, ReportService

TEMPLATES = Path(__file__).resolve().parent / "templates"
COOKIE = "audience_sync_console"
DISPATCHER_WITHIN = timedelta(minutes=3)
FAILURES_PER_PAGE = 50  # a run's rejections
FAILING_PER_PAGE = 500  # the failures page
# Overview filters: a run status, or `never` for pairs that never ran.
FILTERS = (*(s.value for s in RunStatus), "never")
# Paths open without the token: the health check (load balancers) and the login form.
OPEN_PATHS = ("/healthz", "/login")
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` only reaches this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"the console would listen on {host}, beyond this machine, without a token: set "
            "AUDIENCE_SYNC_CONSOLE_TOKEN (then required to see any page), or keep the default "
            "--host 127.0.0.1"
        )


def _templates() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"], default_for_string=True, default=True),
    )
    environment.filters["when"] = _when
    environment.filters["seconds"] = _seconds
    environment.filters["phase_seconds"] = _phase_seconds
    environment.globals["sparkline"] = svg.sparkline
    return environment


def _when(value: datetime | None) -> str:
    return "never" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "running"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _phase_seconds(value: float | None) -> str:
    # A phase is short next to a run: two decimals, so a fast diff does not show as 0.0.
    if value is None:
        return "not reached"
    return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"


class _TokenCheck(BaseHTTPMiddleware):
    """With a token set, every page needs it: as a bearer token or the login cookie."""

    def __init__(self, app: Any, *, token: str, render: Callable[..., HTMLResponse]) -> None:
        super().__init__(app)
        self._token = token
        self._render = render

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path in OPEN_PATHS or self._allowed(request):
            return await call_next(request)
        return self._render(request, "login.html", {"is_retry": False}, status_code=401)

    def _allowed(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and _same(given.strip(), self._token):
            return True
        return _same(request.cookies.get(COOKIE, ""), self._token)


def _knows(standing: AudienceStanding) -> bool:
    """Whether an audience has anything to say of the user: a membership, a value a
    destination holds, a failure, an entry or exit."""
    return (
        bool(standing.is_member)
        or bool(standing.history)
        or any(
            d.accepted_value is not None or d.is_failing or d.is_in_doubt
            for d in standing.destinations
        )
    )


def _page_number(request: Request) -> int:
    """The `page` parameter (from 1); anything else is a page that does not exist."""
    text = request.query_params.get("page", "1")
    if not text.isdigit() or int(text) < 1:
        raise HTTPException(404, "no such page")
    return int(text)


def _same(given: str, token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


def create_app(
    reports: ReportService,
    *,
    registry: CollectorRegistry,
    clock: Callable[[], datetime],
    token: str | None = None,
    is_secure_cookie: bool = False,
) -> Starlette:
    """The console. `token` (None: open, for a loopback bind) guards every page."""
    templates = _templates()

    def render(
        request: Request, name: str, context: dict[str, Any], *, status_code: int = 200
    ) -> HTMLResponse:
        page = templates.get_template(name).render(
            request_path=request.url.path, has_token=token is not None, **context
        )
        return HTMLResponse(page, status_code=status_code)

    async def overview(request: Request) -> Response:
        wanted = request.query_params.get("status") or None
        if wanted is not None and wanted not in FILTERS:
            raise HTTPException(404, f"no status {wanted!r}")
        rows = reports.overview(now=clock())
        shown = [r for r in rows if wanted is None or (r.status or "never") == wanted]
        counts: dict[str, int] = {}
        for row in rows:
            counts[row.status or "never"] = counts.get(row.status or "never", 0) + 1
        return render(
            request,
            "overview.html",
            {
                "rows": shown,
                "wanted": wanted,
                "filters": FILTERS,
                "counts": counts,
                "total": len(rows),
            },
        )

    async def audience(request: Request) -> Response:
        detail = reports.audience(request.path_params["key"])
        oldest_first = list(reversed(detail.runs))
        chart = svg.run_chart(
            [r.members for r in oldest_first],
            [r.entered for r in oldest_first],
            [r.exited for r in oldest_first],
        )
        return render(request, "audience.html", {"audience": detail, "chart": chart})

    async def run(request: Request) -> Response:
        page = _page_number(request)
        detail = reports.run_page(
            request.path_params["run_id"], page=page, per_page=FAILURES_PER_PAGE
        )
        if page > detail.pages:
            raise HTTPException(404, "no such page")
        return render(request, "run.html", {"detail": detail, "run": detail.run})

    async def user(request: Request) -> Response:
        wanted = request.query_params.get("id")
        if wanted is None or not wanted.strip():
            return render(request, "user.html", {"user": None, "standings": []})
        standings = reports.explain(wanted)
        if not any(_knows(standing) for standing in standings):
            raise NotFoundError(f"no audience has ever held or sent user {wanted!r}")
        return render(request, "user.html", {"user": wanted, "standings": standings})

    async def failures(request: Request) -> Response:
        page = _page_number(request)
        found = reports.failing_page(page=page, per_page=FAILING_PER_PAGE)
        if page > found.pages:
            raise HTTPException(404, "no such page")
        grouped: dict[str, list[Any]] = {}
        for user in found.users:
            grouped.setdefault(user.audience, []).append(user)
        return render(request, "failures.html", {"grouped": grouped, "found": found})

    async def healthz(request: Request) -> Response:
        health = reports.health(now=clock(), dispatcher_within=DISPATCHER_WITHIN)
        body = {
            "status": "ok" if health.is_healthy else "unhealthy",
            "reason": health.reason,
            "dispatcher_at": health.dispatcher_at.isoformat() if health.dispatcher_at else None,
        }
        return JSONResponse(body, status_code=200 if health.is_healthy else 503)

    async def metrics(request: Request) -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    async def login(request: Request) -> Response:
        if token is None:
            return RedirectResponse("/", status_code=303)
        if request.method == "GET":
            return render(request, "login.html", {"is_retry": False})
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if not _same(given, token):
            return render(request, "login.html", {"is_retry": True}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE, given, httponly=True, samesite="strict", secure=is_secure_cookie
        )
        return response

    async def not_found(request: Request, exc: Exception) -> Response:
        detail = str(exc) if isinstance(exc, NotFoundError) else "there is no such page"
        if isinstance(exc, HTTPException) and exc.status_code != 404:
            status = exc.status_code
            context = {"title": HTTPStatus(status).phrase, "message": exc.detail}
            return render(request, "error.html", context, status_code=status)
        context = {"title": "Not found", "message": detail}
        return render(request, "error.html", context, status_code=404)

    routes = [
        Route("/", overview),
        Route("/audiences/{key}", audience),
        Route("/runs/{run_id:int}", run),
        Route("/users", user),
        Route("/failures", failures),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/login", login, methods=["GET", "POST"]),
    ]
    middleware = [Middleware(_TokenCheck, token=token, render=render)] if token is not None else []
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={NotFoundError: not_found, HTTPException: not_found},
    )
