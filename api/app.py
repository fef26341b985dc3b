"""The FastAPI application: ``create_app(settings)``; ``siteplan serve`` runs it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.routes import designs, jobs, meta, metrics, photos, projects, subjects, tenants
from api.runner import Runner
from api.services import RateLimiter, Services, TokenCache
from privacy.vault import FileKeyStore, Vault
from siteplan import PIPELINE_VERSION
from siteplan.db import init_db
from siteplan.settings import Settings

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over the limit with a 413 while they stream (never buffered whole).
    Photo and design uploads get the upload limit; everything else the JSON limit."""

    def __init__(self, app: ASGIApp, *, json_bytes: int, upload_bytes: int) -> None:
        self.app, self.json_bytes, self.upload_bytes = app, json_bytes, upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        is_upload = (path.startswith("/v1/uploads/") and scope["method"] == "PATCH") or path.endswith("/file")
        limit = self.upload_bytes if is_upload else self.json_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        seen = 0
        started = False

        async def guarded_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        body = (
            '{"error": {"code": "too_large", "message": "the request body is larger than '
            f'{max(1, limit // 1024)} KB", "field": null}}}}'
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def build_services(settings: Settings) -> Services:
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    factory = init_db(settings.db_url)
    vault = Vault(settings.vault_dir, FileKeyStore(settings.key_dir))
    limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
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
                svc.runner.shutdown()  # type: ignore[attr-defined]
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
    ):
        app.include_router(r, prefix="/v1")
    app.include_router(metrics.router)
    app.add_middleware(BodyLimit, json_bytes=settings.max_json_bytes, upload_bytes=settings.max_upload_bytes + 65536)
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
