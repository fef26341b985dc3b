"""Background work of the API process: anonymising finished uploads and running queued jobs.

Durable state is in the DB, so a restart loses nothing: at start-up the runner picks up every
photo still in quarantine and every job still queued or running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from api.routes.common import expire_replays
from api.services import Services
from api.uploads import expire_uploads
from privacy import register
from privacy.anonymize import AnonymizationPolicy
from privacy.ingest import ingest
from privacy.lifecycle import expire_exports
from privacy.sandbox import SandboxUnavailable
from privacy.vault import VaultError
from siteplan.consent import consent_problem
from siteplan.db import Job, Photo, Project
from siteplan.paths import lifecycle_paths

log = logging.getLogger(__name__)


STALE_JOB = timedelta(hours=2)  # a "running" job not updated for this long is taken as abandoned
STALE_CLAIM = timedelta(minutes=15)  # an "anonymising" claim older than this is taken as abandoned
SWEEP_EVERY_S = 3600.0  # how often expired unfinished uploads are looked for


def ingest_photo(svc: Services, photo_id: str) -> None:
    """Quarantine -> anonymised (or rejected). Safe to run twice, from any number of processes:
    a photo is claimed with one conditional UPDATE, and only the claimant works on it."""
    with svc.factory.begin() as db:
        claimed = db.execute(
            update(Photo)
            .where(Photo.id == photo_id, Photo.state == "quarantined", Photo.original_object.is_not(None))
            .values(state="anonymising", updated_at=datetime.now(UTC))
        ).rowcount  # type: ignore[attr-defined]
        if not claimed:
            return
        p = db.get(Photo, photo_id)
        assert p is not None
        if consent_problem(db, db.get(Project, p.project_id)):
            # Checked when the work starts: an ended contract or a restricted client's photo is
            # not processed; it stays sealed in quarantine.
            p.state = "quarantined"
            return
        key_id, original = p.contract_id, p.original_object
        assert original is not None
    try:
        res = ingest(svc.vault, key_id=key_id, original=original, policy=AnonymizationPolicy())
    except SandboxUnavailable:
        # Our side failed, not the file: back to quarantine, untouched, for the next attempt
        # (the runner picks quarantined photos up at start-up).
        with svc.factory.begin() as db:
            db.execute(update(Photo).where(Photo.id == photo_id).values(state="quarantined"))
        raise
    except VaultError:
        log.warning("photo %s: its quarantined original is unreadable", photo_id[:8])
        with svc.factory.begin() as db:
            p = db.get(Photo, photo_id)
            if p is not None:
                p.state, p.error = "rejected", "the upload could not be read back; please upload it again"
        return
    with svc.factory.begin() as db:
        p = db.get(Photo, photo_id)
        if p is None:  # erased meanwhile: drop what we made
            if res.photo:
                svc.vault.delete(key_id, res.photo.object_id)
            return
        if res.original_destroyed:
            p.original_object = None
        if res.photo is None:
            p.state, p.error = "rejected", res.error
        else:
            p.state, p.object, p.sha256 = "anonymised", res.photo.object_id, res.photo.sha256
            p.intrinsics, p.faces, p.plates = res.intrinsics, res.faces, res.plates
        register.record(
            db,
            tenant_id=p.tenant_id,
            actor="system",
            action="photo_anonymised",
            categories=["photos", "derived_media"],
            purpose="privacy gate: metadata, faces and plates",
            ref=p.id,
        )


class Runner:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        n = svc.settings.ingest_workers
        self._ingest = ThreadPoolExecutor(max_workers=n, thread_name_prefix="ingest") if n else None
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job") if svc.settings.run_jobs else None
        self._lock = threading.Lock()
        self._stopped = False
        self._timer: threading.Timer | None = None

    def _sweep(self) -> None:
        """Delete expired unfinished uploads, idempotency records and unclaimed contract exports
        (30 days) now, and again every hour
        while the server runs (a replay record of a tenant that sends no more requests would
        otherwise stay: they were purged only inside that tenant's next request)."""
        try:
            expire_uploads(self.svc)
        except Exception as exc:
            log.error("upload expiry sweep failed: %s", type(exc).__name__)
        try:
            with self.svc.factory.begin() as db:
                expire_replays(db)
        except Exception as exc:
            log.error("replay record sweep failed: %s", type(exc).__name__)
        try:
            expire_exports(self.svc.factory, lifecycle_paths(self.svc.settings))
        except Exception as exc:
            log.error("export expiry sweep failed: %s", type(exc).__name__)
        with self._lock:
            if not self._stopped:
                self._timer = threading.Timer(SWEEP_EVERY_S, self._sweep)
                self._timer.daemon = True
                self._timer.start()

    def resume(self) -> None:
        """Pick up what a stopped process left: quarantined photos, abandoned claims, queued jobs;
        start the hourly sweep of expired uploads."""
        self._sweep()
        stale = datetime.now(UTC) - STALE_CLAIM
        with self.svc.factory.begin() as db:
            db.execute(
                update(Photo).where(Photo.state == "anonymising", Photo.updated_at < stale).values(state="quarantined")
            )
            db.execute(
                update(Job)
                .where(Job.state == "running", Job.updated_at < datetime.now(UTC) - STALE_JOB)
                .values(state="queued")
            )
        with self.svc.factory() as db:
            photos = list(db.scalars(select(Photo.id).where(Photo.state == "quarantined")))
            # Interactive plan jobs only: batch reprocessing has its own driver (`siteplan reprocess`),
            # so a batch never queues in front of a designer waiting for a plan.
            jobs = list(
                db.scalars(select(Job.id).where(Job.state == "queued", Job.kind == "plan").order_by(Job.created_at))
            )
        for pid in photos:
            self.submit_ingest(pid)
        for jid in jobs:
            self.submit_job(jid)
        if photos or jobs:
            log.info("resumed %d photos and %d jobs", len(photos), len(jobs))

    def submit_ingest(self, photo_id: str) -> Future[None] | None:
        if self._ingest is None:
            return None
        return self._ingest.submit(self._safe, ingest_photo, photo_id)

    def submit_job(self, job_id: str) -> Future[None] | None:
        if self._jobs is None:
            return None
        from workers.project_job import run_project_job

        return self._jobs.submit(
            self._safe, lambda svc, jid: run_project_job(svc.settings, svc.factory, svc.vault, jid), job_id
        )

    def _safe(self, fn: Callable[[Services, str], None], item_id: str) -> None:
        try:
            fn(self.svc, item_id)
        except Exception as exc:
            log.error(
                "background %s failed on %s: %s", getattr(fn, "__name__", "task"), item_id[:8], type(exc).__name__
            )

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
        for ex in (self._ingest, self._jobs):
            if ex is not None:
                ex.shutdown(wait=True, cancel_futures=True)
