"""Measure on a finished job's site: segments in the uploaded photos' pixels, as the reference
takes them, answered with each length and its 1-sigma, or null with the reason. One
implementation: ``reconstruct.measure.measure``, which ``siteplan measure`` calls too."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import uuid
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import DB, ReadCaller, ServicesDep
from api.errors import ERROR_RESPONSES, ApiError, not_found
from api.routes.projects import get_project, require_active
from api.schemas import Strict
from dataprotection import register
from dataprotection.consent import CLIENT_RESTRICTED, MESSAGES, consent_problem
from dataprotection.lifecycle import hold_scratch
from privacy.metadata import orient_point
from reconstruct.reference import Segment
from siteplan.db import Job, Photo, PlanFile
from siteplan.outputs import SITE_MODEL
from siteplan.states import JobState, PhotoState

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)

MAX_SEGMENTS = 50


class MeasureRequest(Strict):  # unknown fields, non-finite numbers, lone surrogates: 422 (#24)
    segments: list[Segment] = Field(
        min_length=1,
        max_length=MAX_SEGMENTS,
        description="each: image (a photo id of the project), a and b (pixels of the photo as uploaded, "
        "before its EXIF orientation, corner origin), as in the reference",
    )


class MeasuredEndpoint(BaseModel):
    lifted_on: str = Field(description="multi-view (triangulated from the photos that see it), plane or surface")
    views: int = Field(description="photos the point was found in, the clicked one included")
    sigma_m: float | None = None
    reason: str | None = Field(default=None, description="why it is not a multi-view point")
    surface_disagrees_by: float | None = Field(
        default=None, description="metres between the photos' point and the surface lift, where they disagree"
    )


class MeasuredSegment(BaseModel):
    image: str
    a: tuple[float, float]
    b: tuple[float, float]
    length_m: float | None = Field(description="null when the segment cannot be measured; see reason")
    sigma_m: float | None = Field(description="1-sigma of length_m (scale, endpoint lifts, poses)")
    reason: str | None = None
    lifted_on: dict[str, str] | None = None
    sigma_parts_m: dict[str, float | None] | None = None
    endpoints: dict[str, MeasuredEndpoint] | None = Field(default=None, description="how each end was found")
    warnings: list[str] = Field(default_factory=list)


class MeasureResult(BaseModel):
    job_id: str
    site_from_job: str = Field(description="the job whose site model was measured (the same, or the one it reused)")
    segments: list[MeasuredSegment]


@router.post(
    "/jobs/{job_id}/measure",
    response_model=MeasureResult,
    responses={409: ERROR_RESPONSES[401] | {"description": "the job is not done, or kept no site model"}},
)
def measure_on_job(job_id: str, body: MeasureRequest, db: DB, svc: ServicesDep, c: ReadCaller) -> MeasureResult:
    """Lengths on the site model of a finished job, exactly as ``siteplan measure`` gives them."""
    from reconstruct.measure import measure
    from reconstruct.site import load_site

    j = db.get(Job, job_id)
    if j is None:
        raise not_found("job")
    if j.state != JobState.DONE:
        raise ApiError(409, "not_ready", f"the job is {j.state}; its site can be measured once it is done")
    project = get_project(db, j.project_id)
    require_active(db, project)
    if consent_problem(db, project) == CLIENT_RESTRICTED:
        raise ApiError(409, "subject_restricted", MESSAGES[CLIENT_RESTRICTED])
    source = str((j.result or {}).get("reused_site_from_job") or j.id)
    pf = db.scalars(select(PlanFile).where(PlanFile.job_id == source, PlanFile.name == SITE_MODEL)).first()
    if pf is None or not svc.vault.exists(pf.contract_id, pf.object):
        raise ApiError(
            409, "no_site_model", "this job kept no site model (it ran before sites were kept); run a new job"
        )
    photos = {
        p.id: p
        for p in db.scalars(
            select(Photo).where(Photo.project_id == project.id, Photo.state == PhotoState.ANONYMISED)
        ).all()
    }
    segs: list[Segment] = []
    for i, s in enumerate(body.segments):
        ph = photos.get(s.image)
        if ph is None or ph.intrinsics is None:
            raise ApiError(422, "invalid", "no such anonymised photo in this project", field=f"segments.{i}.image")
        intr: dict[str, Any] = ph.intrinsics
        w, h = int(intr["original_width"]), int(intr["original_height"])
        pts = []
        for end in ("a", "b"):
            u, v = getattr(s, end)
            if not (0 <= u <= w and 0 <= v <= h):
                raise ApiError(
                    422, "invalid", f"the point lies outside the photo ({w} x {h} px)", field=f"segments.{i}.{end}"
                )
            pts.append(orient_point(u, v, w, h, int(intr["orientation"])))
        segs.append(Segment(image=f"{ph.id}.jpg", a=pts[0], b=pts[1]))
    # The site is decrypted into scratch for as long as the measurement runs, held like a job's
    # (a contract's termination waits for it), and wiped in every case.
    scratch = svc.settings.scratch_dir / f"measure-{uuid.uuid4().hex}"
    running = hold_scratch(scratch)
    try:
        with tarfile.open(fileobj=io.BytesIO(svc.vault.read_bytes(pf.contract_id, pf.object))) as tar:
            tar.extractall(scratch / "site", filter="data")
        # The anonymised photos too: every click is found again in the photos that see it and
        # triangulated, as `siteplan measure` does (without them it falls back to the surface).
        for ph in photos.values():
            if ph.object is not None:
                svc.vault.export_to(ph.contract_id, ph.object, scratch / "photos" / f"{ph.id}.jpg")
        measured = measure(load_site(scratch / "site"), segs, photos_dir=scratch / "photos")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(running)
    register.record(
        db,
        tenant_id=c.tenant_id,
        actor=c.token_id,
        action="site_measured",
        categories=["site_models"],
        purpose="lengths measured on the site model for the designer",
        ref=j.id,
    )
    db.commit()
    out = []
    for given, m in zip(body.segments, measured, strict=True):
        out.append(
            MeasuredSegment(
                image=given.image,
                a=given.a,
                b=given.b,
                length_m=m.get("length_m"),
                sigma_m=m.get("sigma_m"),
                reason=m.get("reason"),
                lifted_on=m.get("lifted_on"),
                sigma_parts_m=m.get("sigma_parts_m"),
                endpoints=m.get("endpoints"),
                warnings=m.get("warnings", []),
            )
        )
    return MeasureResult(job_id=j.id, site_from_job=source, segments=out)
