"""Projects: one site for one client, under one contract."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import select

from api.deps import DB, ReadCaller, ServicesDep, UploadCaller, hold_contract
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import IDEMPOTENCY_HELP, commit_or_conflict, count, fingerprint, remember, replay, set_location
from api.schemas import ProjectCreate, ProjectList, ProjectPublic
from api.services import Services
from dataprotection.fields import new_project, open_reference
from siteplan.db import Contract, Project, Subject
from siteplan.states import ContractState

router = APIRouter(prefix="/projects", tags=["projects"], responses=ERROR_RESPONSES)


def _public(svc: Services, p: Project) -> ProjectPublic:
    return ProjectPublic(
        id=p.id,
        contract_id=p.contract_id,
        subject_id=p.subject_id,
        reference=open_reference(svc.vault.keys, p),
        created_at=p.created_at,
    )


def get_project(db: DB, project_id: str) -> Project:
    p = db.get(Project, project_id)
    if p is None:
        raise not_found("project")
    return p


def require_active(db: DB, p: Project) -> None:
    hold_contract(db, p.contract_id)  # until the commit: never a row behind an ended contract
    ct = db.get(Contract, p.contract_id)
    if ct is None or ct.state != ContractState.ACTIVE:
        raise ApiError(
            409, "contract_not_active", "the project's contract has ended; nothing more can be done under it"
        )


@router.post("", status_code=201, response_model=ProjectPublic)
def post_project(
    body: ProjectCreate,
    db: DB,
    svc: ServicesDep,
    c: UploadCaller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> ProjectPublic:
    fp = fingerprint(svc, c.tenant_id, "POST", "/projects", body.model_dump(mode="json"))
    if (rec := replay(db, idempotency_key, fp)) is not None:
        set_location(response, rec.location)
        return _public(svc, get_project(db, rec.body["id"]))
    ct = db.get(Contract, body.contract_id)
    if ct is None:
        raise ApiError(422, "invalid", "no such contract", field="contract_id")
    hold_contract(db, ct.id)  # until the commit (api.deps.hold_contract); re-reads the state
    if ct.state != ContractState.ACTIVE:
        raise ApiError(409, "contract_not_active", "the contract has ended; no new project can be started under it")
    if body.subject_id is not None:
        s = db.get(Subject, body.subject_id)
        if s is None or s.contract_id != ct.id:
            raise ApiError(422, "invalid", "no such client under this contract", field="subject_id")
    p = new_project(
        db,
        svc.vault.keys,
        tenant_id=c.tenant_id,
        contract_id=ct.id,
        subject_id=body.subject_id,
        reference=body.reference,
    )
    out = _public(svc, p)
    loc = f"/v1/projects/{p.id}"
    # The replay record holds only the id (the reference is sealed): a replay reads the row again.
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=201, body={"id": p.id}, location=loc)
    commit_or_conflict(db)
    set_location(response, loc)
    return out


@router.get("", response_model=ProjectList)
def list_projects(
    db: DB,
    svc: ServicesDep,
    _: ReadCaller,
    subject_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> ProjectList:
    stmt = select(Project).order_by(Project.created_at, Project.id)
    if subject_id is not None:
        stmt = stmt.where(Project.subject_id == subject_id)
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return ProjectList(items=[_public(svc, r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


@router.get("/{project_id}", response_model=ProjectPublic)
def read_project(project_id: str, db: DB, svc: ServicesDep, _: ReadCaller) -> ProjectPublic:
    return _public(svc, get_project(db, project_id))
