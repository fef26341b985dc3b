"""The FastAPI application: ``create_app(settings)``; ``siteplan serve`` runs it with uvicorn."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.access_log import AccessLog
from api.routes import designs, jobs, measure, meta, metrics, photos, projects, subjects, tenants
from api.routes.photos import TUS_VERSION
from api.runner import Runner
from api.services import RateLimiter, Services, TokenCache
from dataprotection.vault import FileKeyStore, Vault
from siteplan import PIPELINE_VERSION
from siteplan.db import init_db
from siteplan.settings import Settings

log = logging.getLogger(__name__)


# The request line and headers together: a phone app sends well under 2 KB.
MAX_HEADER_BYTES = 16 * 1024


class BodyLimit:
    """Refuse request bodies over the limit with a 413 while they stream (never buffered whole),
    and oversized headers with a 431. Photo and design uploads get the upload limit; everything
    else the JSON limit."""

    def __init__(self, app: ASGIApp, *, json_bytes: int, upload_bytes: int) -> None:
        self.app, self.json_bytes, self.upload_bytes = app, json_bytes, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        raw = scope.get("headers") or []
        if (
            len(scope.get("raw_path") or b"")
            + len(scope.get("query_string") or b"")
            + sum(len(k) + len(v) + 4 for k, v in raw)
            > MAX_HEADER_BYTES
        ):
            await _send_error(
                scope,
                receive,
                send,
                431,
                "headers_too_large",
                f"the request headers exceed {MAX_HEADER_BYTES // 1024} KB",
            )
            return
        is_upload = (path.startswith("/v1/uploads/") and scope["method"] == "PATCH") or path.endswith("/file")
        limit = self.upload_bytes if is_upload else self.json_bytes
        headers = dict(raw)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        seen = 0
        started = tripped = swallowing = False

        async def guarded_receive() -> Message:
            nonlocal seen, tripped
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    tripped = True
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started, swallowing
            if swallowing:
                return
            if msg["type"] == "http.response.start":
                if tripped:
                    # The route caught the overflow and answered with something of its own
                    # (FastAPI's JSON parser turns any error into a 400): it is a 413.
                    swallowing = True
                    await self._refuse(scope, receive, send, limit)
                    return
                started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started and not swallowing:
                await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        message = f"the request body is larger than {max(1, limit // 1024)} KB"
        await _send_error(scope, receive, send, 413, "too_large", message)


async def _send_error(scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
    """The one error shape (api.errors), sent from middleware below the routes' handlers."""
    await errors.error_response(status, code, message)(scope, receive, send)


class Guard:
    """The outermost layer of our own. An exception no route handled is logged in one line (its
    type and the route's template: never a traceback, a file path or a value) and answered with
    the generic 500; it goes no further, so the server logs no traceback either (Starlette's own
    error middleware re-raises after answering). tus answers carry Tus-Resumable, errors too."""

    def __init__(self, app: ASGIApp, *, paths: Callable[[], list[str]]) -> None:
        self.app, self._paths = app, paths
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def _template(self, scope: Scope) -> str:
        """The template of the route the request matched (``/v1/projects/{project_id}``), from
        the app's OpenAPI paths. (The endpoint this layer looked up is not in its scope: a layer
        below copies the scope, and included routers wrap their routes, so every line said '?'.)"""
        if self._templates is None:
            try:
                paths = self._paths()
            except Exception:  # the log line must never fail
                paths = []
            self._templates = [
                (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(t)) + "$"), t) for t in paths
            ]
        path = scope.get("path", "")
        return next((t for rx, t in self._templates if rx.match(path)), "?")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope.get("path", ""), scope.get("method", "")
        tus = method != "OPTIONS" and (
            path.startswith("/v1/uploads") or (path.endswith("/uploads") and method == "POST")
        )
        started = False

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                if tus and not any(k.lower() == b"tus-resumable" for k, _ in msg.get("headers", [])):
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"tus-resumable", TUS_VERSION.encode())]}
            await send(msg)

        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            # An id or a filter with a NUL names nothing, and PostgreSQL's text cannot hold one
            # (psycopg refused the query: a 500 on every route that looks an id up).
            status, code = (404, "not_found") if "\x00" in path else (422, "invalid")
            await _send_error(scope, receive, guarded_send, status, code, "NUL characters are not allowed")
            return
        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:
            log.error("unhandled %s on %s %s", type(exc).__name__, method, self._template(scope))
            if not started:
                await _send_error(
                    scope,
                    receive,
                    guarded_send,
                    500,
                    "internal_error",
                    "something went wrong on our side; please try again later",
                )


class _TooLarge(Exception):
    pass


def build_services(settings: Settings) -> Services:
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = FileKeyStore(settings.key_dir)
    factory = init_db(settings.db_url, keys)
    vault = Vault(settings.vault_dir, keys)
    limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst, settings.root / "ratelimit")
    return Services(
        settings=settings, factory=factory, vault=vault, limiter=limiter, tokens=TokenCache(settings.token_cache_s)
    )


def create_app(settings: Settings | None = None, *, background: bool = True) -> FastAPI:
    """The API. ``background=False`` leaves uploads quarantined and jobs queued (tests, or a
    deployment where separate workers do that work)."""
    settings = settings or Settings()
    svc = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if background:
            runner = Runner(svc)
            svc.runner = runner
            runner.resume()
        try:
            yield
        finally:
            if svc.runner is not None:
                svc.runner.shutdown()
                svc.runner = None

    app = FastAPI(
        title="Siteplan API",
        version=PIPELINE_VERSION,
        description="Upload site photos, start a plan, fetch the results; every call acts for one controller.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.services = svc
    errors.install(app)
    for r in (
        meta.router,
        tenants.router,
        subjects.router,
        projects.router,
        photos.router,
        designs.router,
        jobs.router,
        measure.router,
    ):
        app.include_router(r, prefix="/v1")
    app.include_router(metrics.router)
    app.add_middleware(BodyLimit, json_bytes=settings.max_json_bytes, upload_bytes=settings.max_upload_bytes + 65536)
    app.add_middleware(Guard, paths=lambda: list(app.openapi().get("paths", {})))
    # The access log outside the Guard, so it records the 500 the Guard answers (api/access_log.py).
    app.add_middleware(AccessLog, paths=lambda: list(app.openapi().get("paths", {})))  # the outermost of ours
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn's worker processes: settings come from the environment."""
    return create_app(Settings())


def run(settings: Settings, *, workers: int = 1) -> None:
    import uvicorn

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": "warning",
        "access_log": False,
        # A restart lets uploads in flight finish, but never waits forever on a stalled client
        # (tus resumes whatever it cuts).
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }
    if workers > 1:
        # Each worker is a process with its own runner; photos and jobs are claimed atomically in
        # the DB, so none is processed twice. Migrate once here, before the workers start.
        build_services(settings)
        uvicorn.run("api.app:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
