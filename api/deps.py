"""Request dependencies: the caller's token, scopes, rate limit, and a tenant-scoped DB session."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import access_log
from api.errors import ApiError
from api.services import CachedToken, Services
from siteplan.db import tenant_session
from siteplan.tenancy import hash_secret, verify_token

_bearer = HTTPBearer(auto_error=False, description="An API token (`siteplan token create`).")


# The light dependencies are ``async def``: FastAPI runs sync dependencies in a thread pool, and
# each such hop costs more CPU than the check itself.


async def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


ServicesDep = Annotated[Services, Depends(services)]


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    token_id: str
    scopes: frozenset[str]


async def caller(
    svc: ServicesDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    unauthorized = ApiError(
        401, "unauthorized", "a valid API token is required", headers={"WWW-Authenticate": "Bearer"}
    )
    if creds is None or creds.scheme.lower() != "bearer":
        raise unauthorized
    key = hash_secret(creds.credentials)
    hit = svc.tokens.get(key)
    if hit is None:
        hit = await run_in_threadpool(_verify, svc, creds.credentials)
        if hit is None:
            raise unauthorized
        svc.tokens.put(key, hit)
    c = Caller(hit.tenant_id, hit.token_id, hit.scopes)
    access_log.note_tenant(c.tenant_id)
    wait = svc.limiter.take(c.token_id)
    if wait:
        raise ApiError(429, "rate_limited", "too many requests; slow down", headers={"Retry-After": str(int(wait))})
    return c


def _verify(svc: Services, secret: str) -> CachedToken | None:
    with svc.factory() as db:
        tok = verify_token(db, secret)
        if tok is None:
            return None
        until = time.monotonic() + svc.tokens.ttl_s
        if tok.expires_at is not None:
            exp = tok.expires_at if tok.expires_at.tzinfo else tok.expires_at.replace(tzinfo=UTC)
            until = min(until, time.monotonic() + (exp - datetime.now(UTC)).total_seconds())
        return CachedToken(tok.tenant_id, tok.id, frozenset(tok.scopes.split()), until)


CallerDep = Annotated[Caller, Depends(caller)]


def need(scope: str) -> Callable[[Caller], Awaitable[Caller]]:
    async def check(c: CallerDep) -> Caller:
        if scope not in c.scopes and "admin" not in c.scopes:
            # The token is known and the tenant is the caller's own: a missing scope is a 403.
            raise ApiError(403, "forbidden", f"this token lacks the '{scope}' scope")
        return c

    return check


ReadCaller = Annotated[Caller, Depends(need("read"))]
UploadCaller = Annotated[Caller, Depends(need("upload"))]
AdminCaller = Annotated[Caller, Depends(need("admin"))]


def db_session(svc: ServicesDep, c: CallerDep) -> Iterator[Session]:
    """A session that sees only the caller's tenant (the scoping lives in siteplan.db)."""
    s = tenant_session(svc.factory, c.tenant_id)
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()


DB = Annotated[Session, Depends(db_session)]
