"""Data subjects' rights (P7): access/portability (export), erasure. Rectification and
restriction are plain field updates (api/routes/subjects.py); restriction is enforced where
processing happens (the runner and the job check it at the moment they start)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from privacy.subjects import open_subject
from privacy.vault import Vault
from siteplan.db import Design, Job, Photo, PlanFile, Project, Subject, SubjectToken


def export_subject(db: Session, vault: Vault, subject: Subject) -> bytes:
    """A portable zip: the subject's record as JSON, and every photo and plan of their projects,
    with a manifest of SHA-256 hashes."""
    cid = subject.contract_id
    f = open_subject(vault.keys, cid, subject.id, subject.name_enc, subject.address_enc, subject.phone_enc)
    files = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:

        def add(name: str, data: bytes) -> None:
            z.writestr(name, data)
            files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

        projects = db.scalars(select(Project).where(Project.subject_id == subject.id)).all()
        record = {
            "id": subject.id,
            "name": f.name,
            "address": f.address,
            "phone": f.phone,
            "restricted": subject.restricted,
            "created_at": subject.created_at.isoformat(),
            "projects": [{"id": p.id, "reference": p.reference} for p in projects],
        }
        add("subject.json", json.dumps(record, indent=1, ensure_ascii=False).encode())
        for p in projects:
            for ph in db.scalars(select(Photo).where(Photo.project_id == p.id, Photo.state == "anonymised")).all():
                assert ph.object is not None
                add(f"projects/{p.id}/photos/{ph.id}.jpg", vault.read_bytes(cid, ph.object))
            jobs = select(Job.id).where(Job.project_id == p.id)
            for pf in db.scalars(select(PlanFile).where(PlanFile.job_id.in_(jobs))).all():
                add(f"projects/{p.id}/plans/{pf.job_id}/{pf.name}", vault.read_bytes(cid, pf.object))
        z.writestr(
            "manifest.json",
            json.dumps(
                {"format": "siteplan.subject-export/v1", "created_at": datetime.now(UTC).isoformat(), "files": files},
                indent=1,
            ),
        )
    return buf.getvalue()


def delete_project_rows(db: Session, project_ids: list[str]) -> dict[str, int]:
    """Delete these projects and every row that hangs off them (plan files, jobs, photos,
    designs). Objects in the vault are the caller's to shred. Returns the counts per table."""
    jobs = select(Job.id).where(Job.project_id.in_(project_ids))
    counts: dict[str, int] = {}
    for name, stmt in (
        ("plan_files", delete(PlanFile).where(PlanFile.job_id.in_(jobs))),
        ("jobs", delete(Job).where(Job.project_id.in_(project_ids))),
        ("photos", delete(Photo).where(Photo.project_id.in_(project_ids))),
        ("designs", delete(Design).where(Design.project_id.in_(project_ids))),
        ("projects", delete(Project).where(Project.id.in_(project_ids))),
    ):
        counts[name] = db.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
    return counts


def delete_contract_rows(db: Session, contract_id: str) -> dict[str, int]:
    """Every row of one contract's personal data: its projects (as above) and its subjects."""
    project_ids = list(db.scalars(select(Project.id).where(Project.contract_id == contract_id)))
    counts = delete_project_rows(db, project_ids)
    subjects = select(Subject.id).where(Subject.contract_id == contract_id)
    for name, stmt in (
        ("subject_index", delete(SubjectToken).where(SubjectToken.subject_id.in_(subjects))),
        ("subjects", delete(Subject).where(Subject.contract_id == contract_id)),
    ):
        counts[name] = db.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
    return counts


@dataclass(frozen=True)
class Erasure:
    projects: int
    objects: int
    project_ids: tuple[str, ...] = ()


def erase_subject(db: Session, vault: Vault, subject: Subject) -> Erasure:
    """The subject, their projects, and every photo, design and plan of those projects: rows
    deleted, objects shredded. Running jobs of those projects are cancelled first."""
    cid = subject.contract_id
    projects = list(db.scalars(select(Project.id).where(Project.subject_id == subject.id)))
    jobs = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects))))
    db.execute(
        update(Job)
        .where(Job.id.in_(jobs), Job.state.in_(("queued", "running")))
        .values(state="cancelled", error="the client's data was erased")
    )
    objects: list[str] = []
    for ph in db.scalars(select(Photo).where(Photo.project_id.in_(projects))).all():
        objects += [o for o in (ph.object, ph.original_object) if o]
    for d in db.scalars(select(Design).where(Design.project_id.in_(projects))).all():
        objects += [d.object] if d.object else []
    objects += list(db.scalars(select(PlanFile.object).where(PlanFile.job_id.in_(jobs))))
    delete_project_rows(db, projects)
    db.execute(delete(SubjectToken).where(SubjectToken.subject_id == subject.id))
    db.delete(subject)
    db.flush()
    shredded = sum(vault.delete(cid, o) for o in objects)
    return Erasure(len(projects), shredded, tuple(projects))
