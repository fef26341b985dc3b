"""Designs: a descriptor (units, axes, scalable) and one mesh file (GLB, OBJ, STL, PLY, DAE)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import DB, ReadCaller, ServicesDep, UploadCaller
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import IDEMPOTENCY_HELP, commit_or_conflict, count, fingerprint, remember, replay, set_location
from api.routes.projects import get_project, require_active
from api.schemas import DesignCreate, DesignList, DesignPublic
from api.services import Services
from dataprotection.fields import design_descriptor, new_design
from dataprotection.lifecycle import ContractBusy, contract_shared
from dataprotection.vault import CHUNK
from siteplan.db import Contract, Design, tenant_session
from siteplan.paths import lifecycle_paths
from siteplan.states import ContractState

router = APIRouter(
    tags=["designs"],
    responses=ERROR_RESPONSES | {415: ERROR_RESPONSES[401] | {"description": "unsupported design format"}},
)

FORMATS = {
    "model/gltf-binary": "glb",
    "model/obj": "obj",
    "model/stl": "stl",
    "application/sla": "stl",
    "application/ply": "ply",
    "model/vnd.collada+xml": "dae",
}


def _public(svc: Services, d: Design) -> DesignPublic:
    return DesignPublic(
        id=d.id,
        project_id=d.project_id,
        descriptor=design_descriptor(svc.vault.keys, d),
        file_format=d.file_format,
        size=d.size,
        created_at=d.created_at,
    )


@router.post("/projects/{project_id}/designs", status_code=201, response_model=DesignPublic)
def post_design(
    project_id: str,
    body: DesignCreate,
    db: DB,
    svc: ServicesDep,
    c: UploadCaller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> DesignPublic:
    project = get_project(db, project_id)
    fp = fingerprint(svc, c.tenant_id, "POST", f"/projects/{project_id}/designs", body.model_dump(mode="json"))
    if (rec := replay(db, idempotency_key, fp)) is not None:
        set_location(response, rec.location)
        return _public(svc, _get(db, rec.body["id"]))
    require_active(db, project)
    d = new_design(
        db,
        svc.vault.keys,
        tenant_id=c.tenant_id,
        project_id=project.id,
        contract_id=project.contract_id,
        descriptor=body.descriptor.model_dump(mode="json", exclude={"file"}),
    )
    out = _public(svc, d)
    loc = f"/v1/designs/{d.id}"
    # Only the id: the name is sealed, and a replay reads the row again.
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=201, body={"id": d.id}, location=loc)
    commit_or_conflict(db)
    set_location(response, loc)
    return out


@router.get("/projects/{project_id}/designs", response_model=DesignList)
def list_designs(
    project_id: str,
    db: DB,
    svc: ServicesDep,
    _: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> DesignList:
    get_project(db, project_id)
    stmt = select(Design).where(Design.project_id == project_id).order_by(Design.created_at, Design.id)
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return DesignList(items=[_public(svc, r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


def _get(db: DB, design_id: str) -> Design:
    d = db.get(Design, design_id)
    if d is None:
        raise not_found("design")
    return d


@router.get("/designs/{design_id}", response_model=DesignPublic)
def get_design(design_id: str, db: DB, svc: ServicesDep, _: ReadCaller) -> DesignPublic:
    return _public(svc, _get(db, design_id))


@router.put(
    "/designs/{design_id}/file",
    response_model=DesignPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in FORMATS},
        }
    },
    responses={
        409: ERROR_RESPONSES[401] | {"description": "contract not active"},
        413: ERROR_RESPONSES[401] | {"description": "too large"},
        415: ERROR_RESPONSES[401] | {"description": "unsupported format"},
    },
)
async def put_design_file(
    design_id: str,
    request: Request,
    svc: ServicesDep,
    c: UploadCaller,
    content_type: Annotated[str, Header()],
) -> DesignPublic:
    """The design's mesh, self-contained (a GLB, or an OBJ/STL/PLY/DAE without external files)."""
    fmt = FORMATS.get(content_type.split(";")[0].strip().lower())
    if fmt is None:
        raise ApiError(415, "unsupported_type", f"send the design as one of: {', '.join(sorted(FORMATS))}")
    contract_id = await run_in_threadpool(_begin_put, svc, c.tenant_id, design_id)
    w = await run_in_threadpool(svc.vault.writer, contract_id)
    batch = bytearray()
    size = 0
    limit = svc.settings.max_upload_bytes
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise ApiError(413, "too_large", f"a design file may be at most {limit // 2**20} MB")
            batch += piece
            if len(batch) >= CHUNK:
                await run_in_threadpool(w.write, bytes(batch))
                batch.clear()
        if size == 0:
            raise ApiError(422, "invalid", "the design file is empty")
        await run_in_threadpool(w.write, bytes(batch))
        return await run_in_threadpool(_commit_put, svc, c.tenant_id, design_id, contract_id, w, fmt)
    except BaseException:
        # Whatever cut the body short (a refusal, a dropped client, the body-size middleware,
        # a cancelled task): the sealed temporary file goes, never left in the vault.
        w.abort()  # a close and an unlink: done here even when the task is being cancelled
        raise


def _commit_put(svc: Services, tenant_id: str, design_id: str, contract_id: str, w: Any, fmt: str) -> DesignPublic:
    """Into the vault under the contract's data lock, shared, once the design and its contract
    are still there: a termination or an erasure during the upload leaves no file (410)."""
    try:
        with contract_shared(lifecycle_paths(svc.settings), contract_id):
            with tenant_session(svc.factory, tenant_id) as db:
                d = db.get(Design, design_id)
                ct = db.get(Contract, contract_id)
                if d is None or ct is None or ct.state != ContractState.ACTIVE:
                    raise ApiError(410, "gone", "the design was deleted, or its contract ended, during the upload")
            info = w.commit()
            return _finish_put(svc, tenant_id, design_id, contract_id, info.object_id, fmt, info.size)
    except ContractBusy as exc:
        raise ApiError(409, "busy", str(exc)) from None


def _begin_put(svc: Services, tenant_id: str, design_id: str) -> str:
    # Short sessions around the upload: no DB connection is held while the body streams in.
    with tenant_session(svc.factory, tenant_id) as db:
        d = _get(db, design_id)
        require_active(db, get_project(db, d.project_id))
        return d.contract_id


def _finish_put(
    svc: Services, tenant_id: str, design_id: str, contract_id: str, obj: str, fmt: str, size: int
) -> DesignPublic:
    with tenant_session(svc.factory, tenant_id) as db:
        d = db.get(Design, design_id)
        if d is None:  # erased while it was uploading: keep nothing
            svc.vault.delete(contract_id, obj)
            raise not_found("design")
        old = d.object
        d.object, d.file_format, d.size = obj, fmt, size
        db.commit()
        if old:
            svc.vault.delete(d.contract_id, old)
        return _public(svc, d)
