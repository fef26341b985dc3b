"""The access log: one structured line per request, on by default, without personal data.

Each line is a JSON object on the logger ``siteplan.access`` (level INFO)::

    {"method": "GET", "route": "/v1/projects/{project_id}", "status": 200, "duration_ms": 4.1,
     "tenant": "3f2a..."}

- ``route`` is the route's template, never the path: ids in paths, query strings and file names
  stay out of the log (a design's file name, a photo's original name can be personal data).
- ``tenant`` is the calling controller's id (a random id, not a name), or null before
  authentication (401s, /v1/health, /metrics).
- No client address, user agent, token or header is logged: an IP address is personal data.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("siteplan.access")

# One mutable slot per request, set by the middleware; the auth dependency writes the tenant into
# it (a dict shared by reference survives the context copies of thread pools and task groups).
_REQUEST: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("siteplan_access", default=None)


def note_tenant(tenant_id: str) -> None:
    """Called once the caller is authenticated (api.deps.caller)."""
    slot = _REQUEST.get()
    if slot is not None:
        slot["tenant"] = tenant_id


class RouteTemplates:
    """The template a path matches (``/v1/jobs/{job_id}``), from the app's OpenAPI paths."""

    def __init__(self, paths: Callable[[], list[str]]) -> None:
        self._paths = paths
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def __call__(self, path: str) -> str:
        if self._templates is None:
            try:
                paths = self._paths()
            except Exception:  # the log line must never fail
                paths = []
            # Longest first: a literal path wins over a template that also matches it.
            self._templates = [
                (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(t)) + "$"), t)
                for t in sorted(paths, key=lambda t: (t.count("{"), -len(t)))
            ]
        return next((t for rx, t in self._templates if rx.match(path)), "?")


class AccessLog:
    """Outermost middleware: times the request, records the status sent and logs one line."""

    def __init__(self, app: ASGIApp, *, paths: Callable[[], list[str]]) -> None:
        self.app, self.template = app, RouteTemplates(paths)
        if not logging.getLogger().handlers and not log.handlers:
            # A uvicorn worker process (serve --workers N) has no logging set up: still log.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        slot: dict[str, Any] = {"tenant": None, "status": None}
        token = _REQUEST.set(slot)
        t0 = time.perf_counter()

        async def recording_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                slot["status"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            _REQUEST.reset(token)
            line = {
                "method": scope.get("method", ""),
                "route": self.template(scope.get("path", "")),
                # None: the client went away before an answer started.
                "status": slot["status"],
                "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
                "tenant": slot["tenant"],
            }
            log.info(json.dumps(line, separators=(",", ":")))
