"""Request dependencies: the caller's token, scopes, rate limit, and a tenant-scoped DB session."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
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
from dataprotection.lifecycle import ContractBusy, contract_shared
from dataprotection.tenancy import hash_secret, verify_token
from siteplan.db import Contract, tenant_session
from siteplan.paths import lifecycle_paths
from siteplan.states import ContractState

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
    """A session that sees only the caller's tenant (the scoping lives in siteplan.db). The
    contract locks a route takes through it (``hold_contract``) are released after its commit."""
    s = tenant_session(svc.factory, c.tenant_id)
    held = ExitStack()
    s.info["contract_locks"] = (lifecycle_paths(svc.settings), held, set())
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
        held.close()


def hold_contract(db: Session, contract_id: str) -> None:
    """Hold the contract's data lock, shared, until this request's session has committed: a row
    created under the contract (a subject, project, design, upload or job) is then either in
    before a termination or an erasure starts (which takes it away with the rest), or refused
    after it (409): never left behind an ended contract. A session not opened by db_session
    (the runner's, a PATCH's own) holds nothing here."""
    entry = db.info.get("contract_locks")
    if entry is None:
        return
    paths, held, have = entry
    if contract_id in have:
        return
    try:
        held.enter_context(contract_shared(paths, contract_id, wait_s=0.0))
    except ContractBusy:
        ct = db.get(Contract, contract_id, populate_existing=True)
        if ct is None or ct.state != ContractState.ACTIVE:
            return  # the caller's state check answers (409 contract_not_active)
        try:  # an erasure, a sweep, or a termination that is just starting
            held.enter_context(contract_shared(paths, contract_id))
        except ContractBusy as exc:
            raise ApiError(409, "busy", str(exc)) from None
    have.add(contract_id)
    db.get(Contract, contract_id, populate_existing=True)  # the state as it is under the lock


DB = Annotated[Session, Depends(db_session)]
