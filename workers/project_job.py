"""The one job driver: a queued ``jobs`` row to done, failed or cancelled.

claim (one conditional UPDATE, a lease) -> ingest (the project's anonymised photos and its
design from the vault into scratch, the inputs checked and oriented) -> reconstruct -> plan ->
report -> publish (the outputs sealed into the vault and recorded in one transaction). Every
state transition of a job is written here, by :func:`run_project_job`.

Three callers, one code path, different inputs (docs/workers.md):
- the API (``api.runner`` only schedules it), for a job a designer queued;
- ``siteplan reprocess`` (``workers.reprocess``), for a copy of a finished job at a new version;
- ``siteplan demo`` (``workers.demo``), which first plays the designer's part (the gate on Ray,
  the photos and the design sealed into the vault, a job queued with its inputs), then runs the
  job here with a :class:`Target` that builds it in its out folder.

The durable state is the ``jobs`` row. Consent is checked when the job starts, not only when it
was queued: an ended contract or a restricted subject stops it before any photo is decrypted.
Worker scratch holds decrypted photos only while the job runs and is wiped in every case.
Crash recovery: a job whose process died is queued again by the recovery pass
(``api.runner.Runner.recover``, ``workers.reprocess.run_batch``) and resumes here from its last
finished stage (the sealed site checkpoint), or fails with the reason after its attempts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dataprotection import register
from dataprotection.consent import MESSAGES, consent_problem
from dataprotection.fields import design_descriptor
from dataprotection.lifecycle import hold_scratch
from dataprotection.vault import Vault
from reconstruct.errors import ScaleReferenceError
from reconstruct.reference import ScaleReference, check_reference
from reconstruct.report import SITE_KEYS, write_report_html
from reconstruct.sfm import SfmConfig
from siteplan import PIPELINE_VERSION, leases
from siteplan.db import BillingRecord, Design, Job, Photo, PlanFile, Project, Tenant
from siteplan.outputs import OUTPUTS, SITE_MODEL, SITE_MODEL_FILES, media_type
from siteplan.settings import Settings
from siteplan.states import JobState, PhotoState
from workers.routing import Pool
from workers.runtime import ray_runtime
from workers.stages import JobCancelled, JobFailed, SubProgress, map_placement, map_reference, site_and_plan
from workers.tasks import count_attempts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where and for whom a job is built, besides its outputs sealed into the vault.

    ``run_dir``: None, the job is built in its scratch (``scratch/<job>/out``, photos beside it)
    and nothing of it outlives the job; a folder (the demo's ``out/demo``), the site and plan are
    built there with the photos in ``run_dir/photos``, and left there. ``names``: the photos'
    file names by id (default ``<id>.jpg``): the run's photos, the model's images and the
    montages are named by them. ``progress``, ``sub_progress``: told as the job advances, besides
    the job row."""

    run_dir: Path | None = None
    names: Mapping[str, str] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    sub_progress: SubProgress | None = None


class JobRefused(JobFailed):
    """The job may not run (contract not active, subject restricted): nothing was processed."""


def check_consent(db: Session, job: Job) -> Project:
    project = db.get(Project, job.project_id)
    if project is None:
        raise JobRefused("the project no longer exists")
    reason = consent_problem(db, project)
    if reason:
        raise JobRefused(MESSAGES[reason])
    return project


def run_project_job(
    settings: Settings,
    factory: sessionmaker[Session],
    vault: Vault,
    job_id: str,
    progress: Callable[[str], None] | None = None,
    target: Target | None = None,
) -> None:
    """Run one queued job to done or failed; never raises for a job's own failure."""
    scratch = settings.scratch_dir / job_id
    target = target or Target()
    # Where each stage task marks its attempts (workers.tasks.count_attempts), counted into the
    # job row after each stage.
    attempts_dir = target.run_dir / ".attempts" if target.run_dir else scratch / "attempts"

    def cancelled() -> bool:
        """Whether the job was cancelled (or its rows deleted, or its lease lost to another
        process) since it was claimed."""
        with factory() as db:
            row = db.execute(select(Job.state, Job.lease_holder).where(Job.id == job_id)).first()
        return row is None or row[0] == JobState.CANCELLED or row[1] != leases.holder()

    emit = progress or target.progress or (lambda m: log.info("%s", m))

    def say(message: str) -> None:
        if cancelled():  # at each step of the job: a cancelled job goes no further
            raise JobCancelled()
        emit(message)

    t_job = time.perf_counter()
    timings: dict[str, float] = {}
    with factory.begin() as db:
        # Claim the job with one conditional UPDATE: of several processes, exactly one runs it.
        # The claim is a lease (siteplan/leases.py): if this process dies, a running server
        # takes the job back within a minute and resumes it from its checkpoint.
        claimed = db.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(state=JobState.RUNNING, **leases.claim_values())
        ).rowcount  # type: ignore[attr-defined]
        if not claimed:
            return
        job = db.get(Job, job_id)
        assert job is not None
        job.attempts, job.stage, job.progress = job.attempts + 1, "prepare", 0.02
    lease = leases.Lease(factory, Job, job_id).start()
    try:
        running = hold_scratch(scratch)
    except OSError as exc:  # no scratch (disk full, permissions): fail now, never hold the lease on
        log.error("job %s: no scratch directory (%s)", job_id[:8], type(exc).__name__)
        with factory.begin() as db:
            j = db.get(Job, job_id)
            if j is not None and j.state == JobState.RUNNING:
                j.state, j.error = JobState.FAILED, f"internal error ({type(exc).__name__}); the operators were told"
        lease.release()
        return
    try:
        with factory.begin() as db:
            job = db.get(Job, job_id)
            assert job is not None
            project = check_consent(db, job)
            key_id = project.contract_id
            inputs = dict(job.inputs)
            photos = list(
                db.scalars(
                    select(Photo)
                    .where(Photo.project_id == project.id, Photo.state == PhotoState.ANONYMISED)
                    .order_by(Photo.created_at, Photo.id)
                )
            )
            design = db.get(Design, inputs["design_id"])
            if design is None or design.object is None or design.project_id != project.id:
                raise JobFailed("the design has no file yet; upload it first")
            photo_rows = [(p.id, p.object, p.intrinsics) for p in photos]
            timings.update({k: v for k, v in (job.timings or {}).items() if k != "total"})
            photo_digests = sorted((p.id, p.sha256 or p.object or "") for p in photos)
            tenant = db.get(Tenant, job.tenant_id)
            company = tenant.label if tenant is not None else ""
            reuse_ok = job.kind == "plan"  # a reprocess re-runs the site on purpose
            checkpoint = (job.result or {}).get("checkpoint")
            pool: Pool = "batch" if job.kind == "reprocess" else "interactive"
            rejected = db.scalars(
                select(Photo.id).where(Photo.project_id == project.id, Photo.state == PhotoState.REJECTED)
            ).all()
            privacy = {
                "photos": len(photos) + len(rejected),
                "anonymised": len(photos),
                "faces_blurred": sum(p.faces for p in photos),
                "plates_blurred": sum(p.plates for p in photos),
                # Refused uploads are named by id, never by file name.
                "errors": [
                    {"input": target.names.get(pid, pid), "error": "refused by the privacy gate"} for pid in rejected
                ],
            }
            design_row = (design.object, design.file_format, design_descriptor(vault.keys, design))
            tenant_id, project_id = job.tenant_id, project.id
        if len(photo_rows) < SfmConfig().min_photos:
            raise JobFailed(f"only {len(photo_rows)} anonymised photos; at least {SfmConfig().min_photos} are needed")

        # Decrypt into scratch: pycolmap and the renderer read files.
        photos_out = (target.run_dir or scratch) / "photos"
        photos_out.mkdir(parents=True, exist_ok=True)
        good: list[dict[str, Any]] = []
        for pid, obj, intr in photo_rows:
            assert obj is not None and intr is not None
            name = target.names.get(pid) or f"{pid}.jpg"
            vault.export_to(key_id, obj, photos_out / name)
            good.append({"input": pid, "output": name, "intrinsics": intr})
        if (photos_out / "report.json").is_file():  # the gate's report beside them (the demo's)
            privacy["report"] = "photos/report.json"
        obj, fmt, descriptor = design_row
        design_dir = scratch / "design"
        assert obj is not None
        vault.export_to(key_id, obj, design_dir / f"design.{fmt}")
        descriptor["file"] = f"design.{fmt}"
        (design_dir / "design.json").write_text(json.dumps(descriptor))

        # Reference and placement name photos by id, in pixels as uploaded: orient them.
        try:
            # The same model the API validated the body with; a job stored before a rule was
            # added fails with the reason instead of as an internal error.
            ref = ScaleReference.model_validate(inputs["reference"])
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise JobFailed(f"the job's scale reference is invalid at '{where}': {first['msg']}") from None
        try:
            check_reference(ref, {g["input"] for g in good})
            mref = map_reference(ref, good)
            placement = map_placement(dict(inputs["placement"]), good)
        except ScaleReferenceError as exc:
            raise JobFailed(str(exc)) from None
        (scratch / "placement.json").write_text(json.dumps(placement))

        def stage_done(name: str, seconds: float) -> None:
            timings[name] = round(seconds, 2)
            with factory.begin() as db:
                j = db.get(Job, job_id)
                if j is None or j.state == JobState.CANCELLED:
                    raise JobCancelled()
                j.timings = dict(timings)
                j.progress = {"reconstruct": 0.7, "plan": 0.95}.get(name, j.progress)
                j.stage_attempts = _add_attempts(j.stage_attempts, count_attempts(attempts_dir))
            shutil.rmtree(attempts_dir, ignore_errors=True)  # counted once, after the commit
            if name == "reconstruct":
                # Checkpoint the site (sealed in the vault): a retry after a crash resumes at the plan.
                obj = vault.put(key_id, _tar_files(out, SITE_MODEL_FILES))
                with factory.begin() as db:
                    j = db.get(Job, job_id)
                    assert j is not None
                    j.result = {**(j.result or {}), "checkpoint": obj.object_id}

        def fail(msg: str) -> JobFailed:
            return JobFailed(msg)

        last_write = [0.0]

        def sub_progress(stage: str, sub: str, fraction: float, eta_s: float | None) -> None:
            """The job's stage is the one running (so a failed job says where it stopped), its
            progress the share done, and result.progress the sub-stage and ETA; written at most
            every 2 s (and at each stage's start)."""
            if target.sub_progress is not None:
                target.sub_progress(stage, sub, fraction, eta_s)
            now = time.perf_counter()
            if sub != "start" and now - last_write[0] < 2.0:
                return
            last_write[0] = now
            lo, hi = {"reconstruct": (0.1, 0.7), "plan": (0.7, 0.95)}.get(stage, (0.0, 1.0))
            with factory.begin() as db:
                j = db.get(Job, job_id)
                if j is None or j.state == JobState.CANCELLED:
                    raise JobCancelled()
                j.stage, j.progress = stage, round(lo + (hi - lo) * max(0.0, min(1.0, fraction)), 3)
                eta = None if eta_s is None else round(eta_s, 1)
                j.result = {**(j.result or {}), "progress": {"stage": stage, "sub_stage": sub, "eta_s": eta}}

        with factory.begin() as db:
            j = db.get(Job, job_id)
            if j is None or j.state == JobState.CANCELLED:
                raise JobCancelled()
            j.stage, j.progress = "reconstruct", 0.1
        out = target.run_dir or scratch / "out"
        out.mkdir(parents=True, exist_ok=True)
        resumed: bool | str = False
        site_key = _site_key(photo_digests, good, mref)
        reused_from: str | None = None
        if checkpoint and vault.exists(key_id, checkpoint):
            _untar_dir(vault.read_bytes(key_id, checkpoint), out)
            resumed = True
        elif reuse_ok:
            with factory() as db:
                found = _find_site_model(db, project.id, site_key)
            if found is not None and vault.exists(key_id, found[1]):
                _untar_dir(vault.read_bytes(key_id, found[1]), out)
                reused_from = found[0]
                resumed = "the site model of an earlier job on the same photos and reference is reused"
        with ray_runtime(settings):
            info, plan_result = site_and_plan(
                photos_out=photos_out,
                good=good,
                reference=mref,
                design=design_dir / "design.json",
                placement=scratch / "placement.json",
                out=out,
                sfm=SfmConfig(),
                progress=say,
                stage_done=stage_done,
                fail=fail,
                resumed=resumed,
                pool=pool,
                attempts_dir=attempts_dir,
                cancelled=cancelled,
                sub_progress=sub_progress,
            )
        # Report.
        t = time.perf_counter()
        say("[4/4] report")
        report = {
            "job": {"id": job_id, "tenant": tenant_id, "project": project_id, "pipeline_version": PIPELINE_VERSION},
            "privacy": privacy,
            "site": {k: info.get(k) for k in SITE_KEYS},
            "plan": plan_result,
            "designer": {"company": company},
            "reused_site": reused_from is not None,
            "files": sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")),
        }
        timings["report"] = round(time.perf_counter() - t, 2)
        timings["total"] = round(time.perf_counter() - t_job, 2)
        report["timings_s"] = timings
        (out / "report.json").write_text(json.dumps(report, indent=2))
        # The annex links what is published: in a run folder everything beside it, through the
        # API the files it serves.
        write_report_html(report, out / "report.html", published=None if target.run_dir else OUTPUTS)
        # The site model, kept sealed for the next job on the same photos (a PlanFile row, so an
        # erasure, an export and an incident scope see it like the other outputs; never listed).
        site_tar = None if reused_from is not None else _tar_files(out, SITE_MODEL_FILES)

        # Seal the outputs, then publish them in one transaction.
        names = [n for n in OUTPUTS if (out / n).is_file()]
        names += sorted(p.name for p in out.glob("montage_*.jpg"))
        sealed = [(n, vault.put_file(key_id, out / n)) for n in names]
        if site_tar is not None:
            sealed.append((SITE_MODEL, vault.put(key_id, site_tar)))
        with factory.begin() as db:
            j = db.get(Job, job_id)
            if j is None or j.state != JobState.RUNNING or j.lease_holder != leases.holder():
                # Cancelled, or taken over by another process after a stall: one result only.
                for _, o in sealed:
                    vault.delete(key_id, o.object_id)
                return
            for n, o in sealed:
                db.add(
                    PlanFile(
                        tenant_id=tenant_id,
                        job_id=job_id,
                        contract_id=key_id,
                        name=n,
                        media_type=media_type(n),
                        object=o.object_id,
                        size=o.size,
                        sha256=o.sha256,
                    )
                )
            j.state, j.stage, j.progress, j.timings = JobState.DONE, "done", 1.0, dict(timings)
            register.record(
                db,
                tenant_id=tenant_id,
                actor="system",
                action="plan_produced",
                categories=["photos", "site_models", "derived_media"],
                purpose="3D plan, drawings and montages of the site with the design",
                ref=job_id,
            )
            db.add(BillingRecord(tenant_id=tenant_id, contract_id=key_id, job_id=job_id, item="plan"))
            ckpt = (j.result or {}).get("checkpoint") or checkpoint
            if ckpt:
                vault.delete(key_id, str(ckpt))  # the outputs are published: the checkpoint goes
            j.result = {
                "resumed_from_checkpoint": resumed is True,
                "reused_site_from_job": reused_from,
                "site_key": site_key,
                "placement": plan_result.get("placement"),
                "scale_source": info.get("scale_source"),
                "scale_sigma_rel": info.get("scale_sigma_rel"),
                "registered_photos": len(info.get("registered_images", [])),
            }
        say(f"job {job_id[:8]} done in {timings['total']:.1f} s")
    except JobCancelled:
        log.info("job %s stopped: cancelled", job_id[:8])
    except JobFailed as exc:
        with factory.begin() as db:
            j = db.get(Job, job_id)
            if j is None or j.state != JobState.RUNNING or j.lease_holder != leases.holder():
                return  # cancelled meanwhile (that is what it is), or no longer ours
            j.state = JobState.CANCELLED if isinstance(exc, JobRefused) else JobState.FAILED
            j.error = str(exc)
            j.stage_attempts = _add_attempts(j.stage_attempts, count_attempts(attempts_dir))
    except Exception as exc:  # a bug: record the type only (a message may hold personal data)
        # Type only: a traceback carries file paths, and an exception's text may carry values.
        log.error("job %s failed unexpectedly (%s)", job_id[:8], type(exc).__name__)
        with factory.begin() as db:
            j = db.get(Job, job_id)
            if j is None or j.state != JobState.RUNNING or j.lease_holder != leases.holder():
                return
            j.state, j.error = JobState.FAILED, f"internal error ({type(exc).__name__}); the operators were told"
            j.stage_attempts = _add_attempts(j.stage_attempts, count_attempts(attempts_dir))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(running)  # the scratch is gone: a termination waiting for it may go on
        lease.release()


def _add_attempts(before: dict[str, int] | None, now: dict[str, int]) -> dict[str, int]:
    """Stage attempts across job attempts: a job resumed after a crash adds to the first run's."""
    total = dict(before or {})
    for k, v in now.items():
        total[k] = total.get(k, 0) + v
    return total


def _site_key(photos: list[tuple[str, str]], good: list[dict[str, Any]], reference: ScaleReference) -> str:
    """What a site model is made from: the photos (ids and content hashes), their intrinsics, the
    reference, the SfM settings and the pipeline version. Equal keys, equal site."""
    import hashlib

    doc = {
        "photos": photos,
        "intrinsics": sorted((g["input"], json.dumps(g["intrinsics"], sort_keys=True)) for g in good),
        "reference": reference.model_dump(mode="json"),
        "sfm": SfmConfig().model_dump(mode="json"),
        "pipeline": PIPELINE_VERSION,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _find_site_model(db: Session, project_id: str, site_key: str) -> tuple[str, str] | None:
    """(job id, vault object) of the newest finished job of this project whose site has this key."""
    jobs = db.scalars(
        select(Job)
        .where(Job.project_id == project_id, Job.state == JobState.DONE)
        .order_by(Job.updated_at.desc())
    ).all()
    for j in jobs:
        if (j.result or {}).get("site_key") != site_key:
            continue
        pf = db.scalars(select(PlanFile).where(PlanFile.job_id == j.id, PlanFile.name == SITE_MODEL)).first()
        if pf is not None:
            return j.id, pf.object
    return None


def _tar_files(d: Path, names: tuple[str, ...]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n in names:
            if (d / n).exists():
                tar.add(d / n, arcname=n)
    return buf.getvalue()


def _untar_dir(data: bytes, d: Path) -> None:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(d, filter="data")
