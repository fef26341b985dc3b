"""Contract termination by destruction (P8): rows, vault objects, uploads in progress, then the key.

Order matters for a resumable, never-readable-halfway termination: the contract is first marked
``terminating`` (no new work is accepted, running jobs see it at their next check), then every
object is shredded and its rows deleted, and last the data key is destroyed, which makes any
copy that escaped (a backup, a disk block) unreadable. Re-running it finishes what a kill left.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from privacy.vault import Vault
from siteplan.db import Contract, Design, Job, Photo, PlanFile, Project, Subject, SubjectToken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destruction:
    objects: int
    rows: int
    key_destroyed: bool


def terminate_contract(
    db: Session, vault: Vault, *, contract_id: str, disposition: str = "destroy", uploads_dir: Path | None = None
) -> Destruction:
    ct = db.get(Contract, contract_id)
    if ct is None:
        raise LookupError("no such contract")
    ct.state, ct.disposition = "terminating", disposition
    db.flush()
    projects = list(db.scalars(select(Project.id).where(Project.contract_id == contract_id)))
    if projects:
        db.execute(
            update(Job)
            .where(Job.project_id.in_(projects), Job.state.in_(("queued", "running")))
            .values(state="cancelled", error="the contract ended")
        )
    rows = 0
    job_ids = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects)))) if projects else []
    subjects = list(db.scalars(select(Subject.id).where(Subject.contract_id == contract_id)))
    for stmt in (
        delete(PlanFile).where(PlanFile.contract_id == contract_id),
        delete(Job).where(Job.id.in_(job_ids)),
        delete(Photo).where(Photo.contract_id == contract_id),
        delete(Design).where(Design.contract_id == contract_id),
        delete(Project).where(Project.contract_id == contract_id),
        delete(SubjectToken).where(SubjectToken.subject_id.in_(subjects)),
        delete(Subject).where(Subject.contract_id == contract_id),
    ):
        rows += db.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
    objects = vault.drop_container(contract_id)
    if uploads_dir is not None and (uploads_dir / contract_id).exists():
        shutil.rmtree(uploads_dir / contract_id, ignore_errors=True)
    key = vault.keys.destroy(contract_id)
    ct.state = "ended"
    db.flush()
    log.info("contract %s destroyed: %d objects, %d rows, key destroyed: %s", contract_id[:8], objects, rows, key)
    return Destruction(objects, rows, key)
