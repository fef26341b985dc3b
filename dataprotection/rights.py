"""Data subjects' rights (P7), one function each, each recording its own register entry under one
action name: :func:`rectify`, :func:`set_restriction` (restrict, lift), :func:`access` (export)
and :func:`erase`. The API's routes and the CLI call these. A restriction is enforced where
processing happens (the runner and the job check it at the moment they start)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from dataprotection import register
from dataprotection.fields import open_reference
from dataprotection.subjects import SubjectFields, open_subject, read_fields, write_fields
from dataprotection.vault import KeyStore, Vault, discard_upload
from siteplan.db import Design, IdempotencyRecord, Job, Photo, PlanFile, Project, Subject, SubjectToken
from siteplan.states import JobState, PhotoState


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
            "projects": [{"id": p.id, "reference": open_reference(vault.keys, p)} for p in projects],
        }
        add("subject.json", json.dumps(record, indent=1, ensure_ascii=False).encode())
        for p in projects:
            for ph in db.scalars(
                select(Photo).where(Photo.project_id == p.id, Photo.state == PhotoState.ANONYMISED)
            ).all():
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


def _resource_ids(db: Session, project_ids: list[str]) -> list[str]:
    """The ids of these projects and of everything hanging off them."""
    ids = list(project_ids)
    for col, parent in ((Photo.id, Photo.project_id), (Design.id, Design.project_id), (Job.id, Job.project_id)):
        ids += list(db.scalars(select(col).where(parent.in_(project_ids))))
    return ids


def forget_replays(db: Session, ids: list[str]) -> int:
    """Drop the idempotency records of the requests that created these resources. They hold
    ids, a keyed hash of the request, and the first response (a project's reference among
    them); left behind, a replayed creation answered with an erased project's details after
    the data was gone, and its hash confirmed a guessed name. Matched by the record's
    Location, which ends with the resource's id (random hex: no LIKE wildcards)."""
    n = 0
    for i in range(0, len(ids), 200):
        chunk = [x for x in ids[i : i + 200] if x.isalnum()]
        if chunk:
            n += (
                db.execute(  # type: ignore[attr-defined]
                    delete(IdempotencyRecord).where(or_(*(IdempotencyRecord.location.like(f"%/{x}") for x in chunk)))
                ).rowcount
                or 0
            )
    return n


def delete_contract_rows(db: Session, contract_id: str) -> dict[str, int]:
    """Every row of one contract's personal data: its projects (as above) and its subjects, and
    the replay records of the requests that created them."""
    project_ids = list(db.scalars(select(Project.id).where(Project.contract_id == contract_id)))
    subject_ids = list(db.scalars(select(Subject.id).where(Subject.contract_id == contract_id)))
    replays = forget_replays(db, [contract_id, *subject_ids, *_resource_ids(db, project_ids)])
    counts = delete_project_rows(db, project_ids)
    counts["replay_records"] = replays
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


def erase_subject(
    db: Session, vault: Vault, subject: Subject, uploads_dir: Path | None = None, *, ledger: bool = True
) -> Erasure:
    """The subject, their projects, and every photo, design and plan of those projects: rows
    deleted, objects shredded, unfinished uploads (under ``uploads_dir``) shredded with what
    arrived of them. Running jobs of those projects are cancelled first."""
    cid = subject.contract_id
    projects = list(db.scalars(select(Project.id).where(Project.subject_id == subject.id)))
    jobs = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects))))
    db.execute(
        update(Job)
        .where(Job.id.in_(jobs), Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
        .values(state=JobState.CANCELLED, error="the client's data was erased")
    )
    objects: list[str] = []
    for ph in db.scalars(select(Photo).where(Photo.project_id.in_(projects))).all():
        objects += [o for o in (ph.object, ph.original_object) if o]
        if ph.state == PhotoState.UPLOADING and uploads_dir is not None:
            discard_upload(uploads_dir, vault, cid, ph.id)
    for d in db.scalars(select(Design).where(Design.project_id.in_(projects))).all():
        objects += [d.object] if d.object else []
    objects += list(db.scalars(select(PlanFile.object).where(PlanFile.job_id.in_(jobs))))
    forget_replays(db, [subject.id, *_resource_ids(db, projects)])
    delete_project_rows(db, projects)
    db.execute(delete(SubjectToken).where(SubjectToken.subject_id == subject.id))
    db.delete(subject)
    db.flush()
    shredded = sum(vault.delete(cid, o) for o in objects)
    if ledger:
        _log_erasure(vault, subject.tenant_id, subject.id)
    return Erasure(len(projects), shredded, tuple(projects))


# Erasures are remembered beside the keys, which no backup holds: a restored backup made before
# an erasure would otherwise bring the subject back, readable (they are sealed with the contract's
# key, which lives on). The ledger holds random ids only; restore replays it (replay_erasures).
ERASURE_LEDGER = "erasures.jsonl"


def _ledger(vault: Vault) -> Path | None:
    root = getattr(vault.keys, "root", None)
    return Path(root) / ERASURE_LEDGER if root is not None else None


def _log_erasure(vault: Vault, tenant_id: str, subject_id: str) -> None:
    path = _ledger(vault)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"tenant": tenant_id, "subject": subject_id, "at": datetime.now(UTC).isoformat()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def replay_erasures(db: Session, vault: Vault, uploads_dir: Path | None = None) -> list[tuple[str, str]]:
    """Erase again every subject the ledger says was erased and the (restored) database still
    holds; returns their (tenant, subject) ids. Called by restore."""
    path = _ledger(vault)
    if path is None or not path.exists():
        return []
    done: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            sid = str(rec["subject"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line (a crash mid-append): the erasure it names was not committed
        s = db.get(Subject, sid)
        if s is None:
            continue
        tenant = s.tenant_id
        erase_subject(db, vault, s, uploads_dir, ledger=False)
        done.append((tenant, sid))
    return done


# ---- the rights as acts: one function per right, each recording its own register entry ----
# The API's routes and the CLI's `siteplan subject` call these, and nothing else records a right.
# One act, one name in the register (dataprotection/register.py maps the names the CLI used
# before to these when an entry is read: ``register.ACT_NAMES``).
RIGHTS_PURPOSE = {
    "subject_rectified": "rectification (P7)",
    "subject_restricted": "restriction of processing (P7)",
    "subject_restriction_lifted": "restriction lifted (P7)",
    "subject_exported": "access and portability (P7)",
    "subject_erased": "erasure (P7)",
}
RIGHTS_CATEGORIES = {
    "subject_rectified": ["subject_identity", "subject_contact"],
    # What a restriction stops is the processing of the client's photos and what is made of them.
    "subject_restricted": ["photos", "derived_media"],
    "subject_restriction_lifted": ["photos", "derived_media"],
    "subject_exported": ["subject_identity", "subject_contact", "photos", "derived_media"],
    "subject_erased": ["subject_identity", "subject_contact", "photos", "derived_media", "site_models"],
}


def _record(db: Session, *, tenant_id: str, actor: str, action: str, ref: str) -> None:
    register.record(
        db,
        tenant_id=tenant_id,
        actor=actor,
        action=action,
        categories=RIGHTS_CATEGORIES[action],
        purpose=RIGHTS_PURPOSE[action],
        ref=ref,
    )


_UNSET: Any = object()


def rectify(
    db: Session,
    keys: KeyStore,
    subject: Subject,
    *,
    actor: str,
    name: str | None = None,
    address: str | None = _UNSET,
    phone: str | None = _UNSET,
) -> SubjectFields:
    """Rectification (P7): the fields given replace the stored ones (a missing or empty name keeps
    the old name; ``address``/``phone`` not given keep theirs, None clears them)."""
    old = read_fields(keys, subject)
    f = SubjectFields(
        name=name or old.name,
        address=old.address if address is _UNSET else address,
        phone=old.phone if phone is _UNSET else phone,
    )
    write_fields(db, keys, subject, f)
    _record(db, tenant_id=subject.tenant_id, actor=actor, action="subject_rectified", ref=subject.id)
    return f


def set_restriction(db: Session, subject: Subject, restricted: bool, *, actor: str) -> None:
    """Restriction of processing (P7), or its lifting: every job refuses this subject's media
    while it holds (checked where processing starts: dataprotection.consent)."""
    subject.restricted = restricted
    action = "subject_restricted" if restricted else "subject_restriction_lifted"
    _record(db, tenant_id=subject.tenant_id, actor=actor, action=action, ref=subject.id)


def access(db: Session, vault: Vault, subject: Subject, *, actor: str) -> bytes:
    """Access and portability (P7): :func:`export_subject`'s zip, recorded."""
    data = export_subject(db, vault, subject)
    _record(db, tenant_id=subject.tenant_id, actor=actor, action="subject_exported", ref=subject.id)
    return data


def erase(db: Session, vault: Vault, subject: Subject, uploads_dir: Path | None, *, actor: str) -> Erasure:
    """Erasure (P7): :func:`erase_subject`, recorded. The caller holds the contract's data lock
    (``dataprotection.lifecycle.contract_lock``)."""
    tenant_id, subject_id = subject.tenant_id, subject.id
    er = erase_subject(db, vault, subject, uploads_dir)
    _record(db, tenant_id=tenant_id, actor=actor, action="subject_erased", ref=subject_id)
    return er
