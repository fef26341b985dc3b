"""Incident helper (P11): which controllers and data subjects does an object or a time window touch?"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from siteplan.db import Design, Job, Photo, PlanFile, Project, RegisterEntry, Subject


def _subject_of_project(db: Session, project_id: str | None) -> str | None:
    p = db.get(Project, project_id) if project_id else None
    return p.subject_id if p is not None else None


def affected_by_object(db: Session, object_id: str) -> dict[str, Any]:
    """An object name (a vault file) -> its controller, contract, project and data subject."""
    hits: list[dict[str, Any]] = []
    for ph in db.scalars(select(Photo).where(or_(Photo.object == object_id, Photo.original_object == object_id))):
        hits.append(
            {
                "kind": "photo",
                "id": ph.id,
                "controller": ph.tenant_id,
                "contract": ph.contract_id,
                "project": ph.project_id,
                "subject": _subject_of_project(db, ph.project_id),
            }
        )
    for d in db.scalars(select(Design).where(Design.object == object_id)):
        hits.append(
            {
                "kind": "design",
                "id": d.id,
                "controller": d.tenant_id,
                "contract": d.contract_id,
                "project": d.project_id,
                "subject": _subject_of_project(db, d.project_id),
            }
        )
    for pf in db.scalars(select(PlanFile).where(PlanFile.object == object_id)):
        job = db.get(Job, pf.job_id)
        pid = job.project_id if job else None
        hits.append(
            {
                "kind": "plan_file",
                "id": pf.id,
                "controller": pf.tenant_id,
                "contract": pf.contract_id,
                "project": pid,
                "subject": _subject_of_project(db, pid),
            }
        )
    return _summary(hits)


def affected_in_window(db: Session, start: datetime, end: datetime) -> dict[str, Any]:
    """Every processing recorded in the register between ``start`` and ``end`` -> controllers and
    subjects (through the objects the entries name)."""
    hits: list[dict[str, Any]] = []
    for e in db.scalars(select(RegisterEntry).where(RegisterEntry.at >= start, RegisterEntry.at <= end)):
        subject = None
        ref = e.ref
        if ref:
            ph = db.get(Photo, ref)
            job = db.get(Job, ref)
            if db.get(Subject, ref) is not None:
                subject = ref
            elif ph is not None:
                subject = _subject_of_project(db, ph.project_id)
            elif job is not None:
                subject = _subject_of_project(db, job.project_id)
        hits.append({"kind": e.action, "id": ref, "controller": e.tenant_id, "subject": subject})
    return _summary(hits)


def _summary(hits: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "controllers": sorted({h["controller"] for h in hits}),
        "subjects": sorted({h["subject"] for h in hits if h.get("subject")}),
        "items": hits,
    }
