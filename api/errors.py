"""One JSON error shape for every failure: ``{"error": {"code", "message", "field"}}``.

Messages are written for the designer using the app. No stack trace, path, SQL or personal data
ever reaches a response; unexpected errors are logged by type only and answered with a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def not_found(what: str) -> ApiError:
    # Another tenant's resource answers exactly like a missing one (never 403).
    return ApiError(404, "not_found", f"no such {what}")


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    411: "length_required",
    412: "precondition_failed",
    413: "too_large",
    415: "unsupported_type",
    422: "invalid",
    429: "rate_limited",
    431: "headers_too_large",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": _CODES[s].replace("_", " ")} for s in (401, 403, 404, 409, 413, 422, 429)
}


def error_response(status: int, code: str, message: str, field: str | None = None, headers: Any = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    if loc and loc[0] == "header" and parts:  # as the client writes it: Upload-Length
        parts = ["-".join(w.capitalize() for w in parts[0].split("-")), *parts[1:]]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # its loc holds a character position, not a field
            return error_response(422, "invalid", "the body is not valid JSON", None)
        loc = first.get("loc", ())
        # pydantic's message only, never the input value (it may be personal data).
        msg = str(first.get("msg", "invalid input"))
        field = _field(loc)
        ctx = first.get("ctx") or {}
        if first.get("type") == "hostile_value" and ctx.get("field"):
            # api.schemas.Strict: the model-level check names the field inside the body itself.
            inner = str(ctx["field"])
            field = f"{field}.{inner}" if field else inner
            return error_response(422, "invalid", msg, field)
        return error_response(422, "invalid", f"{field}: {msg}" if field else msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        msg = exc.detail if isinstance(exc.detail, str) and exc.status_code != 500 else code.replace("_", " ")
        return error_response(exc.status_code, code, msg, None, getattr(exc, "headers", None))

    # Exceptions no route handled: api.app.Guard (a handler here would let Starlette re-raise them
    # to the server, which logs the traceback with its file paths).
