"""Background work of the API process: anonymising finished uploads and running queued jobs.

Durable state is in the DB, so a restart loses nothing: at start-up the runner picks up every
photo still in quarantine and every job still queued or running.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import select, update

from api.routes.common import expire_replays
from api.services import Services
from api.uploads import expire_uploads
from dataprotection.consent import consent_problem
from dataprotection.lifecycle import expire_exports, scratch_in_use, shred_scratch
from siteplan import leases
from siteplan.db import Job, Photo, Project
from siteplan.paths import lifecycle_paths
from siteplan.states import JobState, PhotoState
from workers.ingest import ingest_photo as run_ingest

log = logging.getLogger(__name__)


SWEEP_EVERY_S = 3600.0  # how often expired unfinished uploads are looked for


def ingest_photo(svc: Services, photo_id: str) -> None:
    """The ingest stage for one photo (workers.ingest.ingest_photo), with this process's services."""
    run_ingest(svc.settings, svc.factory, svc.vault, photo_id)


class FairQueue:
    """Anonymisation queued per tenant and served round-robin: one tenant's photos (say, a
    burst of decompression bombs, each tens of seconds of decoding under the pixel cap) never
    hold another tenant's for longer than one photo's start.

    ``workers`` photos run at once for any one tenant; one more lane is kept for the others, so
    a tenant alone runs as before, and a second tenant's photo starts at once beside the first's
    instead of queueing behind all of them (the sandbox bounds each photo's CPU time and memory:
    privacy/sandbox.py)."""

    def __init__(self, fn: Callable[[str], None], workers: int) -> None:
        self._fn = fn
        self._per_tenant = max(1, workers)
        self._lanes = self._per_tenant + 1
        self._cv = threading.Condition()
        self._queues: dict[str, deque[tuple[str, Future[None]]]] = {}
        self._order: deque[str] = deque()  # tenants in round-robin order
        self._running: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._stopped = False

    def submit(self, tenant_id: str, item_id: str) -> Future[None]:
        fut: Future[None] = Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the queue is shut down")
            if tenant_id not in self._queues:
                self._queues[tenant_id] = deque()
                self._order.append(tenant_id)
            self._queues[tenant_id].append((item_id, fut))
            if len(self._threads) < self._lanes:
                t = threading.Thread(target=self._work, name=f"ingest-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify()
        return fut

    def _next(self) -> tuple[str, str, Future[None]] | None:
        """The first tenant in turn with a photo waiting and a lane of its own free (caller holds
        the condition); that tenant goes to the back of the order."""
        for tenant in list(self._order):
            q = self._queues.get(tenant)
            if q and self._running.get(tenant, 0) < self._per_tenant:
                self._order.remove(tenant)
                self._order.append(tenant)  # served: the others go first next time
                item, fut = q.popleft()
                return tenant, item, fut
        return None

    def _work(self) -> None:
        while True:
            with self._cv:
                picked = None
                while not self._stopped and (picked := self._next()) is None:
                    self._cv.wait()
                if picked is None:
                    return
                tenant, item, fut = picked
                self._running[tenant] = self._running.get(tenant, 0) + 1
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        self._fn(item)
                        fut.set_result(None)
                    except BaseException as exc:  # _safe catches; this is for the future's sake
                        fut.set_exception(exc)
            finally:
                with self._cv:
                    self._running[tenant] -= 1
                    if not self._queues.get(tenant) and not self._running[tenant]:
                        self._queues.pop(tenant, None)
                        self._running.pop(tenant, None)
                        with contextlib.suppress(ValueError):
                            self._order.remove(tenant)
                    self._cv.notify_all()

    def shutdown(self) -> None:
        """Cancel what waits; wait for the photos being anonymised."""
        with self._cv:
            self._stopped = True
            for q in self._queues.values():
                for _, fut in q:
                    fut.cancel()
                q.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()


MAX_JOB_ATTEMPTS = 3  # a job whose process died this many times fails instead of resuming again
SCRATCH_GRACE_S = 30.0  # a scratch directory younger than this may belong to a job starting now


class Runner:
    def __init__(self, svc: Services) -> None:
        self.svc = svc
        n = svc.settings.ingest_workers
        self._ingest = FairQueue(lambda pid: self._safe(ingest_photo, pid), n) if n else None
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job") if svc.settings.run_jobs else None
        self._lock = threading.Lock()
        self._stopped = False
        self._timer: threading.Timer | None = None
        self._recovery: threading.Thread | None = None
        self._wake = threading.Event()
        self._pending: set[str] = set()  # photo and job ids submitted and not finished here

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
        """Pick up what a stopped process left (quarantined photos, claims whose holder is gone,
        queued jobs, orphaned scratch), now and every RECOVER_EVERY_S while the server runs;
        start the hourly sweep of expired uploads."""
        self._sweep()
        self.recover()
        with self._lock:
            if not self._stopped and self._recovery is None:
                self._recovery = threading.Thread(target=self._recover_loop, name="recovery", daemon=True)
                self._recovery.start()

    def _recover_loop(self) -> None:
        while not self._wake.wait(leases.RECOVER_EVERY_S):
            try:
                self.recover()
            except Exception as exc:  # a busy database: the next pass tries again
                log.error("recovery pass failed: %s", type(exc).__name__)

    def recover(self) -> tuple[int, int]:
        """One recovery pass; returns (photos, jobs) submitted.

        1. A photo left ``anonymising`` by a dead holder goes back to quarantine.
        2. A job left ``running`` by a dead holder: its scratch is shredded, then it is queued
           again (it resumes from its sealed checkpoint), or failed with the reason after
           MAX_JOB_ATTEMPTS.
        3. Scratch no live job holds is shredded (a crash before any row said so).
        4. Quarantined photos whose consent allows it and queued plan jobs are submitted, unless
           this process already has them in hand (a restriction lifted resumes its photos here)."""
        db_factory = self.svc.factory
        with db_factory.begin() as db:
            dead_photos = leases.takeable(db, Photo, PhotoState.ANONYMISING)
            for pid, name in dead_photos:
                db.execute(
                    update(Photo)
                    .where(Photo.id == pid, Photo.state == PhotoState.ANONYMISING, leases.held_by(Photo, name))
                    .values(state=PhotoState.QUARANTINED, lease_holder=None, lease_until=None)
                )
            dead_jobs = [jid for jid, _ in leases.takeable(db, Job, JobState.RUNNING)]
        for jid in dead_jobs:
            scratch = self.svc.settings.scratch_dir / jid
            if scratch_in_use(scratch):  # a live process here still works in it: not dead, stalled
                continue
            shred_scratch(scratch)
            with db_factory.begin() as db:
                j = db.get(Job, jid)
                if j is None or j.state != JobState.RUNNING or not leases.gone(j.lease_holder, j.lease_until):
                    continue
                j.lease_holder, j.lease_until = None, None
                if j.attempts >= MAX_JOB_ATTEMPTS:
                    j.state = JobState.FAILED
                    j.error = (
                        f"the job was interrupted {j.attempts} times (the server stopped while it ran); "
                        "start it again, and report it if it keeps happening"
                    )
                else:
                    j.state = JobState.QUEUED
        if dead_photos or dead_jobs:
            log.warning("took back %d photo and %d job claims of stopped processes", len(dead_photos), len(dead_jobs))
        self._shred_orphan_scratch()
        with db_factory() as db:
            quarantined = list(
                db.execute(
                    select(Photo.id, Photo.project_id, Photo.tenant_id)
                    .where(Photo.state == PhotoState.QUARANTINED)
                    .order_by(Photo.created_at)
                )
            )
            blocked: dict[str, bool] = {}
            photos: list[tuple[str, str]] = []
            for pid, proj, tenant in quarantined:
                if proj not in blocked:
                    blocked[proj] = bool(consent_problem(db, db.get(Project, proj)))
                if not blocked[proj]:
                    photos.append((pid, tenant))
            # Interactive plan jobs only: batch reprocessing has its own driver (`siteplan reprocess`),
            # so a batch never queues in front of a designer waiting for a plan.
            queued = select(Job.id).where(Job.state == JobState.QUEUED, Job.kind == "plan")
            jobs = list(db.scalars(queued.order_by(Job.created_at)))
        n_photos = sum(
            self.submit_ingest(pid, tenant) is not None for pid, tenant in photos if pid not in self._pending
        )
        n_jobs = sum(self.submit_job(jid) is not None for jid in jobs if jid not in self._pending)
        if n_photos or n_jobs:
            log.info("resumed %d photos and %d jobs", n_photos, n_jobs)
        return n_photos, n_jobs

    def _shred_orphan_scratch(self) -> None:
        root = self.svc.settings.scratch_dir
        if not root.is_dir():
            return
        now = time.time()
        for d in root.iterdir():
            try:
                if not d.is_dir() or scratch_in_use(d) or now - d.stat().st_mtime < SCRATCH_GRACE_S:
                    continue
            except OSError:
                continue
            shred_scratch(d)

    def _submit(self, ex: ThreadPoolExecutor, fn: Callable[[Services, str], None], item_id: str) -> Future[None] | None:
        with self._lock:
            self._pending.add(item_id)
        try:
            fut = ex.submit(self._safe, fn, item_id)
        except RuntimeError:  # shut down
            self._pending.discard(item_id)
            return None
        fut.add_done_callback(lambda _f: self._pending.discard(item_id))
        return fut

    def submit_ingest(self, photo_id: str, tenant_id: str | None = None) -> Future[None] | None:
        if self._ingest is None:
            return None
        if tenant_id is None:
            with self.svc.factory() as db:
                tenant_id = db.scalar(select(Photo.tenant_id).where(Photo.id == photo_id))
            if tenant_id is None:
                return None
        with self._lock:
            if photo_id in self._pending:
                return None
            self._pending.add(photo_id)
        try:
            fut = self._ingest.submit(tenant_id, photo_id)
        except RuntimeError:  # shut down
            self._pending.discard(photo_id)
            return None
        fut.add_done_callback(lambda _f: self._pending.discard(photo_id))
        return fut

    def submit_job(self, job_id: str) -> Future[None] | None:
        if self._jobs is None:
            return None
        from workers.project_job import run_project_job

        def run(svc: Services, jid: str) -> None:
            run_project_job(svc.settings, svc.factory, svc.vault, jid)

        return self._submit(self._jobs, run, job_id)

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
        self._wake.set()
        if self._ingest is not None:
            self._ingest.shutdown()
        if self._jobs is not None:
            self._jobs.shutdown(wait=True, cancel_futures=True)
