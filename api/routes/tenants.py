"""The caller's own tenant, and its contracts (admin scope to create or terminate)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import DB, AdminCaller, ReadCaller, ServicesDep
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import IDEMPOTENCY_HELP, commit_or_conflict, count, fingerprint, remember, replay, set_location
from api.schemas import ContractCreate, ContractList, ContractPublic, ContractTerminate, TenantPublic
from dataprotection.lifecycle import (
    ContractBusy,
    InvalidRecipientKey,
    TerminationError,
    delete_export,
    stream_export,
    terminate_contract,
)
from dataprotection.register import export_register, verify_entries
from dataprotection.tenancy import create_contract
from siteplan.db import Certificate, Contract, Tenant
from siteplan.paths import lifecycle_paths
from siteplan.states import ContractState

router = APIRouter(tags=["tenants"], responses=ERROR_RESPONSES)


@router.get("/tenant", response_model=TenantPublic)
def get_tenant(db: DB, c: ReadCaller) -> TenantPublic:
    t = db.get(Tenant, c.tenant_id)
    if t is None:
        raise not_found("tenant")
    return TenantPublic(id=t.id, label=t.label, created_at=t.created_at)


def _contract(c: Contract) -> ContractPublic:
    return ContractPublic.model_validate(c, from_attributes=True)


@router.get("/contracts", response_model=ContractList)
def list_contracts(
    db: DB,
    _: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ContractList:
    stmt = select(Contract).order_by(Contract.created_at, Contract.id)
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return ContractList(items=[_contract(r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


@router.post("/contracts", status_code=201, response_model=ContractPublic)
def post_contract(
    body: ContractCreate,
    db: DB,
    svc: ServicesDep,
    c: AdminCaller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> ContractPublic:
    fp = fingerprint(svc, c.tenant_id, "POST", "/contracts", body.model_dump(mode="json"))
    if (rec := replay(db, idempotency_key, fp)) is not None:
        set_location(response, rec.location)
        return ContractPublic.model_validate(rec.body)
    ct = create_contract(db, svc.vault.keys, tenant_id=c.tenant_id, starts_on=body.starts_on, actor=c.token_id)
    out = _contract(ct)
    loc = f"/v1/contracts/{ct.id}"
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=201, body=out, location=loc)
    commit_or_conflict(db)
    set_location(response, loc)
    return out


@router.get("/contracts/{contract_id}", response_model=ContractPublic)
def get_contract(contract_id: str, db: DB, _: ReadCaller) -> ContractPublic:
    ct = db.get(Contract, contract_id)
    if ct is None:
        raise not_found("contract")
    return _contract(ct)


@router.post(
    "/contracts/{contract_id}/terminate",
    response_model=ContractPublic,
    responses={409: ERROR_RESPONSES[401] | {"description": "a different termination is under way"}},
)
def post_terminate(
    contract_id: str, body: ContractTerminate, db: DB, svc: ServicesDep, c: AdminCaller
) -> ContractPublic:
    """End a contract: export (return, transfer), destroy everything, sign a certificate.
    Calling it again resumes a termination that was interrupted."""
    ct = db.get(Contract, contract_id)
    if ct is None:
        raise not_found("contract")
    if body.disposition == "transfer" and not body.recipient_public_key:
        raise ApiError(
            422,
            "invalid",
            "a transfer needs the receiving processor's X25519 public key (PEM)",
            field="recipient_public_key",
        )
    db.rollback()
    try:
        terminate_contract(
            svc.factory,
            svc.vault,
            lifecycle_paths(svc.settings),
            contract_id=contract_id,
            disposition=body.disposition,
            actor=c.token_id,
            recipient_public_pem=body.recipient_public_key.encode() if body.recipient_public_key else None,
        )
    except InvalidRecipientKey as exc:
        raise ApiError(422, "invalid", str(exc), field="recipient_public_key") from None
    except ContractBusy as exc:  # another termination of it is running: it ran none of the steps
        raise ApiError(409, "termination_running", str(exc)) from None
    except TerminationError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    db.expire_all()
    ct = db.get(Contract, contract_id)
    assert ct is not None
    return _contract(ct)


@router.get(
    "/contracts/{contract_id}/certificate",
    responses={
        200: {"description": "the signed destruction certificate (JSON)"},
        409: ERROR_RESPONSES[401] | {"description": "the contract has not ended"},
    },
)
def get_certificate(contract_id: str, db: DB, _: AdminCaller) -> dict[str, Any]:
    """The signed destruction certificate of an ended contract (verify: `siteplan certificate verify`)."""
    if db.get(Contract, contract_id) is None:
        raise not_found("contract")
    cert = db.scalars(select(Certificate).where(Certificate.contract_id == contract_id)).first()
    if cert is None:
        raise ApiError(409, "not_ready", "the contract has not ended; there is no certificate yet")
    return dict(cert.document)


_NO_EXPORT = "this contract has no export archive waiting: it ended with 'destroy', or its export was already deleted"


def _ended(db: Any, contract_id: str) -> None:
    ct = db.get(Contract, contract_id)
    if ct is None:
        raise not_found("contract")
    if ct.state != ContractState.ENDED:  # mid-termination the archive may still be rebuilt: not yet the controller's
        raise ApiError(409, "not_ready", "the contract has not ended; its export is not ready")


@router.get(
    "/contracts/{contract_id}/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the export archive of a contract ended with 'return' (zip) or 'transfer' "
            "(sealed to the receiving processor's key)",
            "content": {"application/zip": {}, "application/octet-stream": {}},
        },
        409: ERROR_RESPONSES[401] | {"description": "no export archive is waiting, or it is being deleted"},
    },
)
def get_export(contract_id: str, db: DB, svc: ServicesDep, c: AdminCaller) -> StreamingResponse:
    """Download the contract's export, whole (no ranges). The service keeps its copy until DELETE
    confirms receipt, or until the deadline in the certificate; the register records the download."""
    _ended(db, contract_id)
    db.rollback()
    try:
        found = stream_export(svc.factory, lifecycle_paths(svc.settings), contract_id, actor=c.token_id)
    except TimeoutError:
        raise ApiError(409, "conflict", "the export is being deleted") from None
    if found is None:
        raise ApiError(409, "not_ready", _NO_EXPORT)
    size, name, chunks = found
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream" if name.endswith(".x25519") else "application/zip",
        headers={
            "Content-Length": str(size),
            "Cache-Control": "private, no-store",
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


@router.delete(
    "/contracts/{contract_id}/export",
    status_code=204,
    response_class=Response,
    responses={409: ERROR_RESPONSES[401] | {"description": "no export archive is waiting, or it is being downloaded"}},
)
def delete_contract_export(contract_id: str, db: DB, svc: ServicesDep, c: AdminCaller) -> Response:
    """Confirm receipt of the export: the service shreds its copy now and records it."""
    _ended(db, contract_id)
    db.rollback()
    why = "end of service: the controller confirmed receipt of its export"
    try:
        gone = delete_export(svc.factory, lifecycle_paths(svc.settings), contract_id, actor=c.token_id, why=why)
    except TimeoutError:
        raise ApiError(409, "conflict", "the export is being downloaded; confirm again when it is done") from None
    if not gone:
        raise ApiError(409, "not_ready", _NO_EXPORT)
    return Response(status_code=204)


@router.get("/register", responses={200: {"description": "the register of processing, oldest first"}})
def get_register(db: DB, c: AdminCaller) -> dict[str, Any]:
    """The controller's register of processing (P9), with the result of checking its hash chain."""
    entries = export_register(db, c.tenant_id)
    check = verify_entries(entries)
    return {"entries": entries, "chain_ok": check.ok, "head": check.head, "problem": check.problem}
