"""Batch reprocessing: re-run stored projects when the pipeline improves.

``siteplan reprocess --since DATE --tenant T --pipeline-version V [--dry-run]``

- Selection: projects with a finished plan whose last run is on or after ``since``; skipped, with
  the reason counted: already done at ``V``, contract not active, client restricted.
- One job row per (project, V), created once: a restarted driver finds the rows it made, so
  nothing is queued twice; queued jobs are run, and ``running`` ones whose heartbeat is older
  than ``stale_after`` (their driver died) are taken back.
- Every job is **claimed** with a conditional UPDATE before it runs, and consent (contract
  active, client not restricted) is checked again at that moment, not only at selection.
- Ray Core, not Ray Data: each job is a small graph of stage tasks with durable state in the DB;
  Ray Data's strength (streaming a dataset through one function) buys nothing here.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dataprotection.consent import consent_problem
from siteplan import leases
from siteplan.db import Job, Project
from siteplan.states import JobState

log = logging.getLogger(__name__)


@dataclass
class Selection:
    version: str
    todo: list[tuple[str, str]] = field(default_factory=list)  # (project id, source job id)
    skipped: Counter[str] = field(default_factory=Counter)


def select_projects(
    db: Session, *, version: str, since: datetime | None = None, tenant: str | None = None
) -> Selection:
    sel = Selection(version)
    stmt = select(Project)
    if tenant:
        stmt = stmt.where(Project.tenant_id == tenant)
    for p in db.scalars(stmt.order_by(Project.created_at, Project.id)):
        jobs = db.scalars(select(Job).where(Job.project_id == p.id).order_by(Job.created_at)).all()
        source = [j for j in jobs if j.state == JobState.DONE and j.kind == "plan"]
        if not source:
            continue
        last = source[-1]
        at = last.updated_at if last.updated_at.tzinfo else last.updated_at.replace(tzinfo=UTC)
        if since is not None and at < since:
            continue
        if any(j.pipeline_version == version and j.state == JobState.DONE for j in jobs):
            sel.skipped["already done at this version"] += 1
            continue
        reason = consent_problem(db, p)
        if reason:
            sel.skipped[reason] += 1
            continue
        sel.todo.append((p.id, last.id))
    return sel


def enqueue(factory: sessionmaker[Session], sel: Selection) -> list[str]:
    """One job per (project, version), made once; returns the ids to run."""
    ids = []
    with factory.begin() as db:
        for project_id, source_id in sel.todo:
            existing = db.scalars(
                select(Job).where(
                    Job.project_id == project_id,
                    Job.pipeline_version == sel.version,
                    Job.kind == "reprocess",
                    Job.state.in_((JobState.QUEUED, JobState.RUNNING)),
                )
            ).first()
            if existing is not None:
                ids.append(existing.id)
                continue
            src = db.get(Job, source_id)
            assert src is not None
            j = Job(
                tenant_id=src.tenant_id,
                project_id=project_id,
                kind="reprocess",
                state=JobState.QUEUED,
                pipeline_version=sel.version,
                inputs=dict(src.inputs),
                timings={},
            )
            db.add(j)
            db.flush()
            ids.append(j.id)
    return ids


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "failed": self.failed,
            "refused": dict(self.refused),
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 1),
        }


def _progress(out: TextIO, i: int, n: int, t0: float) -> None:
    rate = i / max(time.perf_counter() - t0, 1e-9)
    eta = (n - i) / rate if rate > 0 else float("inf")
    bar = "#" * int(30 * i / max(n, 1))
    out.write(f"\r[{bar:<30}] {i}/{n}  {rate:5.2f} projects/s  ETA {eta:6.0f} s")
    out.flush()


@contextmanager
def driver_lock(path: Path) -> Iterator[None]:
    """One batch driver at a time (per data dir): then every ``running`` batch job found at start
    was left by a driver that died, and is taken back at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError("another reprocessing driver is running") from None
        yield
    finally:
        os.close(fd)


def run_batch(
    factory: sessionmaker[Session],
    sel: Selection,
    process: Callable[[str], None],
    *,
    sole_driver: bool = False,
    stale_after: timedelta = timedelta(minutes=30),
    out: TextIO = sys.stderr,
) -> Summary:
    """Run the selection. ``process(job_id)`` claims the job itself (``run_project_job`` does) and
    leaves it done, failed or cancelled; this driver only feeds it, counts and shows progress.
    ``sole_driver`` (the caller holds :func:`driver_lock`): batch jobs still ``running`` were left
    by a dead driver and are queued again now; otherwise only after ``stale_after``."""
    t0 = time.perf_counter()
    cutoff = datetime.now(UTC) + timedelta(seconds=1) if sole_driver else datetime.now(UTC) - stale_after
    with factory.begin() as db:  # take back jobs whose driver died mid-run
        # A job whose lease ran out (its driver is gone, siteplan/leases.py) is taken back at
        # once; one without a lease only after ``stale_after`` unless we are the sole driver.
        dead = [jid for jid, _ in leases.takeable(db, Job, JobState.RUNNING)]
        db.execute(
            update(Job)
            .where(
                Job.kind == "reprocess",
                Job.state == JobState.RUNNING,
                or_(Job.updated_at < cutoff, and_(Job.id.in_(dead), Job.lease_until.is_not(None))),
            )
            .values(state=JobState.QUEUED, lease_holder=None, lease_until=None)
        )
    ids = enqueue(factory, sel)
    summary = Summary(skipped=Counter(sel.skipped))
    for i, job_id in enumerate(ids, 1):
        with factory() as db:
            j = db.get(Job, job_id)
            state = j.state if j is not None else "gone"
        if state == JobState.QUEUED:
            process(job_id)
        with factory() as db:
            j = db.get(Job, job_id)
            if j is None or j.state == JobState.CANCELLED:
                summary.refused[(j.error if j is not None else None) or "cancelled"] += 1
            elif j.state == JobState.DONE:
                summary.done += 1
            elif j.state == JobState.FAILED:
                summary.failed += 1
        _progress(out, i, len(ids), t0)
    out.write("\n")
    summary.seconds = time.perf_counter() - t0
    return summary


def result_key(project_id: str, inputs: dict[str, Any], version: str) -> str:
    """Results are named by what made them: the same project, inputs and pipeline version give
    the same name, so a retried task overwrites (atomically) instead of adding a second result."""
    import hashlib
    import json

    blob = json.dumps([project_id, inputs, version], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def claim(factory: sessionmaker[Session], job_id: str) -> Job | None:
    """queued -> running with one conditional UPDATE; None if another worker has it. Consent is
    checked here, at the moment processing starts: a refused job is cancelled with the reason."""
    with factory.begin() as db:
        won = db.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1)
        ).rowcount  # type: ignore[attr-defined]
        if not won:
            return None
        j = db.get(Job, job_id)
        assert j is not None
        p = db.get(Project, j.project_id)
        reason = consent_problem(db, p) if p is not None else "project gone"
        if reason:
            j.state, j.error = JobState.CANCELLED, reason
            return None
        db.expunge(j)
        return j
