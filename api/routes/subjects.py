"""Data subjects (the designer's clients): fields sealed per contract, found by blind-index search."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy import func, select

from api.deps import DB, Caller, ReadCaller, ServicesDep, UploadCaller, hold_contract
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import (
    IDEMPOTENCY_HELP,
    commit_or_conflict,
    count,
    fingerprint,
    remember,
    replay,
    set_location,
)
from api.schemas import SubjectCreate, SubjectList, SubjectPublic, SubjectUpdate
from api.services import Services
from dataprotection import register, rights
from dataprotection.lifecycle import ContractBusy, contract_lock
from dataprotection.subjects import SubjectFields, index_key_id, new_subject, query_digests, read_fields
from siteplan.db import Contract, Subject, SubjectToken
from siteplan.paths import lifecycle_paths
from siteplan.states import ContractState

router = APIRouter(prefix="/subjects", tags=["subjects"], responses=ERROR_RESPONSES)


def _public(svc: Services, s: Subject) -> SubjectPublic:
    f = read_fields(svc.vault.keys, s)
    return SubjectPublic(
        id=s.id,
        contract_id=s.contract_id,
        name=f.name,
        address=f.address,
        phone=f.phone,
        restricted=s.restricted,
        created_at=s.created_at,
    )


def _active_contract(db: DB, contract_id: str) -> Contract:
    ct = db.get(Contract, contract_id)
    if ct is not None:
        hold_contract(db, contract_id)  # until the commit (api.deps.hold_contract)
        ct = db.get(Contract, contract_id)
    if ct is None:
        raise ApiError(422, "invalid", "no such contract", field="contract_id")
    if ct.state != ContractState.ACTIVE:
        raise ApiError(409, "contract_not_active", "the contract has ended; no new data can be stored under it")
    return ct


@router.post("", status_code=201, response_model=SubjectPublic)
def post_subject(
    body: SubjectCreate,
    db: DB,
    svc: ServicesDep,
    c: UploadCaller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> SubjectPublic:
    fp = fingerprint(svc, c.tenant_id, "POST", "/subjects", body.model_dump(mode="json"))
    if (rec := replay(db, idempotency_key, fp)) is not None:
        set_location(response, rec.location)
        return _public(svc, _get(db, rec.body["id"]))
    _active_contract(db, body.contract_id)
    f = SubjectFields(body.name, body.address, body.phone)
    s = new_subject(db, svc.vault.keys, tenant_id=c.tenant_id, contract_id=body.contract_id, f=f)
    register.record(
        db,
        tenant_id=c.tenant_id,
        actor=c.token_id,
        action="subject_created",
        categories=["subject_identity", "subject_contact"],
        purpose="client record for a design",
        ref=s.id,
    )
    db.flush()
    out = _public(svc, s)
    loc = f"/v1/subjects/{s.id}"
    # The replay record must not hold the plaintext: store only the id and re-read on replay.
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=201, body={"id": s.id}, location=loc)
    commit_or_conflict(db)
    set_location(response, loc)
    return out


@router.get("", response_model=SubjectList)
def list_subjects(
    db: DB,
    svc: ServicesDep,
    c: ReadCaller,
    q: Annotated[
        str | None, Query(max_length=100, description="Keywords in the name or address (prefixes of 3+ letters).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> SubjectList:
    stmt = select(Subject).order_by(Subject.created_at, Subject.id)
    if q is not None:
        digests = query_digests(svc.vault.keys.get(index_key_id(c.tenant_id)), q)
        if not digests:
            raise ApiError(422, "invalid", "the search has no words", field="q")
        hits = (
            select(SubjectToken.subject_id)
            .where(SubjectToken.digest.in_(digests))
            .group_by(SubjectToken.subject_id)
            .having(func.count(func.distinct(SubjectToken.digest)) == len(set(digests)))
        )
        stmt = stmt.where(Subject.id.in_(hits))
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return SubjectList(items=[_public(svc, r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


def _get(db: DB, subject_id: str) -> Subject:
    s = db.get(Subject, subject_id)
    if s is None:
        raise not_found("subject")
    return s


@router.get("/{subject_id}", response_model=SubjectPublic)
def get_subject(subject_id: str, db: DB, svc: ServicesDep, _: ReadCaller) -> SubjectPublic:
    return _public(svc, _get(db, subject_id))


@router.patch("/{subject_id}", response_model=SubjectPublic)
def patch_subject(
    subject_id: str, body: SubjectUpdate, db: DB, svc: ServicesDep, c: UploadCaller, _: ReadCaller
) -> SubjectPublic:
    """Rectify a subject's data (P7). Needs the read scope too: rectifying is changing what one
    can read."""
    s = _get(db, subject_id)
    rights.rectify(db, svc.vault.keys, s, actor=c.token_id, **body.model_dump(exclude_unset=True))
    db.commit()
    return _public(svc, s)


@router.post("/{subject_id}/restrict", response_model=SubjectPublic)
def restrict_subject(subject_id: str, db: DB, svc: ServicesDep, c: UploadCaller) -> SubjectPublic:
    """Restrict processing (P7): every job refuses this subject's media from now on."""
    return _set_restricted(db, svc, c, subject_id, True)


@router.post("/{subject_id}/lift-restriction", response_model=SubjectPublic)
def lift_restriction(subject_id: str, db: DB, svc: ServicesDep, c: UploadCaller) -> SubjectPublic:
    return _set_restricted(db, svc, c, subject_id, False)


def _set_restricted(db: DB, svc: Services, c: Caller, subject_id: str, restricted: bool) -> SubjectPublic:
    s = _get(db, subject_id)
    rights.set_restriction(db, s, restricted, actor=c.token_id)
    db.commit()
    return _public(svc, s)


@router.get(
    "/{subject_id}/export",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}, "description": "everything about the subject"}},
)
def export(subject_id: str, db: DB, svc: ServicesDep, c: ReadCaller) -> Response:
    """Access and portability (P7): the subject's record and their projects' photos and plans."""
    s = _get(db, subject_id)
    data = rights.access(db, svc.vault, s, actor=c.token_id)
    db.commit()
    return Response(
        data,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="subject-{s.id}.zip"',
            "Cache-Control": "private, no-store",
        },
    )


@router.delete("/{subject_id}", status_code=204, response_class=Response)
def erase(subject_id: str, db: DB, svc: ServicesDep, c: UploadCaller, _: ReadCaller) -> Response:
    """Erasure (P7): the subject, their projects and every photo, design and plan of those.
    Needs the read scope too (an upload-only token cannot see the subject it would erase).
    Holds the contract's data lock: no upload of the subject's projects writes meanwhile."""
    s = _get(db, subject_id)
    try:
        with contract_lock(lifecycle_paths(svc.settings), s.contract_id):
            s = _get(db, subject_id)  # again under the lock: a racing erasure may have won
            rights.erase(db, svc.vault, s, svc.settings.uploads_dir, actor=c.token_id)
            db.commit()
    except ContractBusy as exc:
        raise ApiError(409, "busy", str(exc)) from None
    return Response(status_code=204)
