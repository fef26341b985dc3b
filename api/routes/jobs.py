"""Jobs: start a plan for a project, follow it (poll with ETag), fetch its files."""

from __future__ import annotations

import hashlib
import math
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import DB, ReadCaller, ServicesDep, UploadCaller
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.common import IDEMPOTENCY_HELP, commit_or_conflict, count, fingerprint, remember, replay, set_location
from api.routes.projects import get_project, require_active
from api.schemas import JobCreate, JobList, JobPublic, PlanFilePublic, PlanPublic
from dataprotection import register
from dataprotection.consent import CLIENT_RESTRICTED, MESSAGES, consent_problem
from siteplan import PIPELINE_VERSION
from siteplan.db import Design, Job, Photo, PlanFile
from siteplan.outputs import MEDIA_TYPES, SITE_MODEL
from siteplan.states import JobState, PhotoState

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)


def _public(j: Job) -> JobPublic:
    out = JobPublic.model_validate(j, from_attributes=True)
    if out.result and ({"checkpoint", "site_key"} & set(out.result)):  # internal: the sealed site's handles
        out.result = {k: v for k, v in out.result.items() if k not in ("checkpoint", "site_key")}
    return out


@router.post(
    "/projects/{project_id}/jobs",
    status_code=202,
    response_model=JobPublic,
    responses={409: ERROR_RESPONSES[401] | {"description": "contract ended or client restricted"}},
)
def post_job(
    project_id: str,
    body: JobCreate,
    db: DB,
    svc: ServicesDep,
    c: UploadCaller,
    response: Response,
    idempotency_key: Annotated[str | None, Header(description=IDEMPOTENCY_HELP)] = None,
) -> JobPublic:
    project = get_project(db, project_id)
    fp = fingerprint(svc, c.tenant_id, "POST", f"/projects/{project_id}/jobs", body.model_dump(mode="json"))
    if (rec := replay(db, idempotency_key, fp)) is not None:
        set_location(response, rec.location)
        j = db.get(Job, rec.body["id"])
        return _public(j) if j is not None else JobPublic.model_validate(rec.body)
    require_active(db, project)
    if consent_problem(db, project) == CLIENT_RESTRICTED:
        raise ApiError(409, "subject_restricted", MESSAGES[CLIENT_RESTRICTED])
    d = db.get(Design, body.design_id)
    if d is None or d.project_id != project.id:
        raise ApiError(422, "invalid", "no such design in this project", field="design_id")
    if d.object is None:
        raise ApiError(409, "design_incomplete", "upload the design's file first")
    photos = set(
        db.scalars(select(Photo.id).where(Photo.project_id == project.id, Photo.state == PhotoState.ANONYMISED))
    )
    named = {s.image for s in body.reference.segments}
    if body.placement.image is not None:
        named.add(body.placement.image)
    missing = sorted(named - photos)
    if missing:
        raise ApiError(
            422,
            "invalid",
            "the reference or placement names a photo that is not ready in this project",
            field="reference",
        )
    check_job_inputs(body, _uploaded_sizes(db, named))
    j = Job(
        tenant_id=c.tenant_id,
        project_id=project.id,
        kind="plan",
        state=JobState.QUEUED,
        pipeline_version=PIPELINE_VERSION,
        inputs=body.model_dump(mode="json"),
        timings={},
    )
    db.add(j)
    db.flush()
    register.record(
        db,
        tenant_id=c.tenant_id,
        actor=c.token_id,
        action="plan_requested",
        categories=["photos", "site_models", "derived_media"],
        purpose="3D plan, drawings and montages of the site with the design",
        ref=j.id,
    )
    out = _public(j)
    loc = f"/v1/jobs/{j.id}"
    remember(db, tenant_id=c.tenant_id, key=idempotency_key, fp=fp, status=202, body={"id": j.id}, location=loc)
    commit_or_conflict(db)
    set_location(response, loc)
    if svc.runner is not None:
        svc.runner.submit_job(j.id)
    return out


def _uploaded_sizes(db: DB, photo_ids: set[str]) -> dict[str, tuple[int, int]]:
    """Each named photo's (width, height) as uploaded, before orientation: the frame the
    reference's and placement's pixels are given in."""
    sizes: dict[str, tuple[int, int]] = {}
    for pid, intr in db.execute(select(Photo.id, Photo.intrinsics).where(Photo.id.in_(photo_ids))):
        if isinstance(intr, dict) and intr.get("original_width") and intr.get("original_height"):
            sizes[pid] = (int(intr["original_width"]), int(intr["original_height"]))
    return sizes


def check_job_inputs(body: JobCreate, sizes: dict[str, tuple[int, int]]) -> None:
    """Validate before compute: every input that cannot work is a 422 naming its field, so no
    job is queued (202) only to fail minutes later."""
    ref, pl = body.reference, body.placement
    if not ref.segments and not ref.markers:
        raise ApiError(422, "invalid", "the scale reference has no segments and no markers", field="reference")

    def inside(field: str, image: str, pt: tuple[float, float]) -> None:
        size = sizes.get(image)
        if size is not None and not (0 <= pt[0] <= size[0] and 0 <= pt[1] <= size[1]):
            raise ApiError(
                422,
                "invalid",
                f"{field} lies outside its photo ({size[0]} x {size[1]} pixels, as uploaded)",
                field=field,
            )

    for i, seg in enumerate(ref.segments):
        f = f"reference.segments.{i}"
        if seg.length_m is None:
            raise ApiError(422, "invalid", f"{f}.length_m: a reference segment needs its length", field=f"{f}.length_m")
        inside(f"{f}.a", seg.image, seg.a)
        inside(f"{f}.b", seg.image, seg.b)
        if math.dist(seg.a, seg.b) < 5.0:
            raise ApiError(422, "invalid", f"{f}: the segment is shorter than 5 pixels", field=f)
    if pl.site is None and pl.image is None:
        msg = "placement: give 'site' coordinates or an 'image' with clicks"
        raise ApiError(422, "invalid", msg, field="placement")
    if pl.site is not None and pl.image is not None:
        raise ApiError(422, "invalid", "placement: give 'site' or 'image', not both", field="placement")
    if pl.image is not None:
        if (pl.ground_points is None) == (pl.ground_point is None):
            raise ApiError(
                422, "invalid", "placement: give exactly one of 'ground_points' and 'ground_point'", field="placement"
            )
        for j, pt in enumerate(pl.ground_points or []):
            inside(f"placement.ground_points.{j}", pl.image, pt)
        if pl.ground_point is not None:
            inside("placement.ground_point", pl.image, pl.ground_point)


@router.get("/projects/{project_id}/jobs", response_model=JobList)
def list_jobs(
    project_id: str,
    db: DB,
    _: ReadCaller,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobList:
    get_project(db, project_id)
    stmt = select(Job).where(Job.project_id == project_id).order_by(Job.created_at, Job.id)
    rows = db.scalars(stmt.limit(limit).offset(offset)).all()
    return JobList(items=[_public(r) for r in rows], total=count(db, stmt), limit=limit, offset=offset)


def _get(db: DB, job_id: str) -> Job:
    j = db.get(Job, job_id)
    if j is None:
        raise not_found("job")
    return j


@router.get(
    "/jobs/{job_id}",
    response_model=JobPublic,
    responses={304: {"description": "unchanged since the ETag sent in If-None-Match"}},
)
def get_job(
    job_id: str,
    db: DB,
    _: ReadCaller,
    response: Response,
    if_none_match: Annotated[str | None, Header(max_length=2000)] = None,
) -> JobPublic | Response:
    """Poll a job. Send back the ETag in ``If-None-Match``: an unchanged job answers 304, no body."""
    j = _get(db, job_id)
    out = _public(j)
    etag = '"' + hashlib.sha256(out.model_dump_json().encode()).hexdigest()[:32] + '"'
    # RFC 9110: If-None-Match compares weakly (W/"x" matches "x"), and "*" matches any job.
    tags = [t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")]
    if if_none_match is not None and ("*" in tags or etag in tags):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "no-cache"
    return out


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobPublic,
    responses={409: ERROR_RESPONSES[401] | {"description": "already finished"}},
)
def cancel_job(job_id: str, db: DB, _: UploadCaller) -> JobPublic:
    j = _get(db, job_id)
    if j.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        raise ApiError(409, "conflict", f"the job is already {j.state}")
    j.state, j.error = JobState.CANCELLED, "cancelled on request"
    db.commit()
    return _public(j)


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobPublic,
    responses={409: ERROR_RESPONSES[401] | {"description": "not failed, or the contract ended"}},
)
def retry_job(job_id: str, db: DB, svc: ServicesDep, _: UploadCaller) -> JobPublic:
    """Queue a failed job again (after fixing what its error said); it resumes from its last
    finished stage when one was checkpointed."""
    j = _get(db, job_id)
    if j.state != JobState.FAILED:
        raise ApiError(409, "conflict", f"only a failed job can be retried; this one is {j.state}")
    require_active(db, get_project(db, j.project_id))
    j.state, j.error = JobState.QUEUED, None
    db.commit()
    if svc.runner is not None:
        svc.runner.submit_job(j.id)
    return _public(j)


@router.get(
    "/jobs/{job_id}/plan",
    response_model=PlanPublic,
    responses={409: ERROR_RESPONSES[401] | {"description": "not done yet"}},
)
def get_plan(job_id: str, db: DB, _: ReadCaller) -> PlanPublic:
    j = _get(db, job_id)
    if j.state != JobState.DONE:
        raise ApiError(409, "not_ready", f"the job is {j.state}; its plan is not ready")
    files = db.scalars(
        select(PlanFile).where(PlanFile.job_id == j.id, PlanFile.name != SITE_MODEL).order_by(PlanFile.name)
    ).all()  # the kept site model is internal
    return PlanPublic(
        job_id=j.id,
        files=[
            PlanFilePublic(
                name=f.name, media_type=f.media_type, size=f.size, sha256=f.sha256, url=f"/v1/jobs/{j.id}/plan/{f.name}"
            )
            for f in files
        ],
    )


@router.get(
    "/jobs/{job_id}/plan/{name}",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the file, with its own media type",
            "content": {t: {} for t in sorted({*MEDIA_TYPES.values(), "application/octet-stream"})},
        },
        304: {"description": "unchanged since the ETag sent in If-None-Match"},
    },
)
def get_plan_file(job_id: str, name: str, request: Request, db: DB, svc: ServicesDep, _: ReadCaller) -> Response:
    j = _get(db, job_id)
    f = db.scalars(select(PlanFile).where(PlanFile.job_id == j.id, PlanFile.name == name)).first()
    if f is None or name == SITE_MODEL:
        raise not_found("plan file")
    etag = f'"{f.sha256[:32]}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return StreamingResponse(
        svc.vault.open(f.contract_id, f.object),
        media_type=f.media_type,
        headers={
            "Content-Length": str(f.size),
            "ETag": etag,
            "Cache-Control": "private, no-store",
            "Content-Disposition": f'attachment; filename="{f.name}"',
        },
    )
