"""``siteplan demo``: the main job on a sample folder, through the one job driver.

The demo plays the designer's part first, as the API would take it from the app: a tenant, a
contract and a project; every photo through the privacy gate (one Ray task per photo, the report
in ``out/photos``), each anonymised photo sealed into the vault as a project photo, the design
sealed as the project's design; then a job queued with its inputs in the API's terms (photo ids,
pixels as uploaded, the design's id). That job runs in :func:`workers.project_job.run_project_job`
like any other, built in ``out`` instead of scratch. So a later ``siteplan reprocess`` finds the
demo's project like one made through the API, and takes it to done.

Inputs are checked before any compute: the photos, the scale reference, the design, the placement.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from pydantic import ValidationError

from dataprotection import register
from dataprotection.fields import new_design, new_project
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore, Vault
from privacy.anonymize import AnonymizationPolicy, duplicate_entry, list_images, output_names, write_report
from reconstruct.errors import ScaleReferenceError
from reconstruct.placement import PlacementSpec
from reconstruct.reference import ScaleReference, check_reference, load_reference
from reconstruct.sfm import SfmConfig
from siteplan import PIPELINE_VERSION
from siteplan.db import Job, Photo, init_db
from siteplan.settings import Settings
from siteplan.states import JobState, PhotoState
from workers.project_job import Target, run_project_job
from workers.routing import STAGE_MEMORY_MB, stage_options
from workers.runtime import ray_runtime
from workers.stages import JobFailed, SubProgress, map_placement, map_reference
from workers.tasks import anonymize_task, count_attempts

Progress = Callable[[str], None]
DEMO_COMPANY = "Demo designer"  # the demo's tenant: the business name its report shows


@dataclass
class JobInputs:
    photos_dir: Path
    reference: Path
    design: Path
    placement: Path
    out_dir: Path
    policy: AnonymizationPolicy
    sfm: SfmConfig

    @classmethod
    def from_sample(cls, sample: Path, out_dir: Path) -> JobInputs:
        """A sample-data folder as `make demo` lays it out: photos/, reference.json,
        design/gate.json and placement.json; default policy and SfM settings."""
        return cls(
            photos_dir=sample / "photos",
            reference=sample / "reference.json",
            design=sample / "design" / "gate.json",
            placement=sample / "placement.json",
            out_dir=out_dir,
            policy=AnonymizationPolicy(),
            sfm=SfmConfig(),
        )


def _design(path: Path) -> tuple[dict[str, Any], Path]:
    """The design descriptor (a JSON file naming its model file beside it) and the model file."""
    try:
        desc = json.loads(path.read_text())
        model = path.parent / str(desc.pop("file"))
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise JobFailed(f"{path.name} is not a valid design descriptor (JSON with a 'file', see DESIGN.md)") from None
    if not model.is_file():
        raise JobFailed(f"{model.name} does not exist")
    return desc, model


def run_main_job(
    settings: Settings, inputs: JobInputs, progress: Progress = print, sub_progress: SubProgress | None = None
) -> dict[str, Any]:
    """Run the whole job; returns the report. Raises :class:`JobFailed` with an actionable message.
    ``sub_progress``: (stage, sub-stage, fraction, ETA s) as reconstruct and plan advance."""
    out = inputs.out_dir
    photos = list_images(inputs.photos_dir) if inputs.photos_dir.is_dir() else []
    if not photos:
        raise JobFailed(f"no photos found in {inputs.photos_dir}")
    # Validate the scale reference, the design and the placement before any compute.
    try:
        ref = load_reference(inputs.reference)
        check_reference(ref, {p.name for p in photos})
    except ScaleReferenceError as exc:
        raise JobFailed(str(exc)) from None
    for p in (inputs.design, inputs.placement):
        if not p.is_file():
            raise JobFailed(f"{p.name} does not exist")
    descriptor, model_file = _design(inputs.design)
    try:
        placement = PlacementSpec.model_validate(json.loads(inputs.placement.read_text()))
    except (ValueError, ValidationError):
        raise JobFailed(f"{inputs.placement.name} is not a valid placement (JSON, see DESIGN.md)") from None

    settings.root.mkdir(parents=True, exist_ok=True)
    keys = FileKeyStore(settings.key_dir)
    factory = init_db(settings.db_url, keys)
    vault = Vault(settings.vault_dir, keys)
    with factory.begin() as db:
        tenant = create_tenant(db, keys, label=DEMO_COMPANY)
        contract = create_contract(db, keys, tenant_id=tenant.id)
        project = new_project(db, keys, tenant_id=tenant.id, contract_id=contract.id, reference="demo-site")
        tenant_id, contract_id, project_id = tenant.id, contract.id, project.id
    progress(f"project {project_id[:8]} for tenant {tenant_id[:8]}")

    attempts_dir = out / ".attempts"  # counted into the job row, then removed
    shutil.rmtree(attempts_dir, ignore_errors=True)
    photos_out = out / "photos"
    photos_out.mkdir(parents=True, exist_ok=True)
    with ray_runtime(settings):
        # 1. Privacy gate, one task per photo: what the API does for each upload.
        t = time.perf_counter()
        progress(f"[1/4] anonymise: {len(photos)} photos (metadata rebuilt, faces and plates blurred)")
        pol = inputs.policy.model_dump()
        names = output_names(photos)
        refs = [
            anonymize_task.options(**stage_options("gpu", memory_mb=STAGE_MEMORY_MB["anonymise"])).remote(
                str(p), str(photos_out), pol, str(attempts_dir), names[p]
            )
            for p in photos
            if names[p] is not None
        ]
        entries: list[dict[str, Any]] = [duplicate_entry(p) for p in photos if names[p] is None]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                entries.append(ray.get(ready[0]))
            except ray.exceptions.RayError as exc:  # a bug or lost workers: the entry says which, no path
                raise JobFailed(f"the privacy gate failed on a photo ({type(exc).__name__}); try again") from None
            e = entries[-1]
            status = "error: " + e["error"] if e["error"] else f"{len(e['faces'])} faces, {len(e['plates'])} plates"
            progress(f"      {len(entries)}/{len(photos)} {e['input']}: {status}")
        entries.sort(key=lambda e: e["input"])
        write_report(photos_out, entries)
        gate_s = round(time.perf_counter() - t, 2)
        gate_attempts = count_attempts(attempts_dir)
        shutil.rmtree(attempts_dir, ignore_errors=True)
        good = [e for e in entries if e["output"]]
        if len(good) < inputs.sfm.min_photos:
            raise JobFailed(f"only {len(good)} photos could be used; at least {inputs.sfm.min_photos} are needed")
        try:  # the inputs must fit the photos that could be used, said in the photos' own names
            map_reference(ref, entries)
            map_placement(placement.model_dump(mode="json"), entries)
        except ScaleReferenceError as exc:
            raise JobFailed(str(exc)) from None

        # The photos and the design into the vault, and the job queued, as through the API.
        by_input: dict[str, str] = {}
        shown: dict[str, str] = {}
        with factory.begin() as db:
            for e in entries:
                src = inputs.photos_dir / e["input"]
                row = Photo(
                    tenant_id=tenant_id,
                    project_id=project_id,
                    contract_id=contract_id,
                    state=PhotoState.REJECTED,
                    length=src.stat().st_size,
                    error=e["error"],
                )
                if e["output"]:
                    sealed = vault.put_file(contract_id, photos_out / e["output"])
                    row.state, row.object, row.sha256 = PhotoState.ANONYMISED, sealed.object_id, sealed.sha256
                    row.intrinsics, row.faces, row.plates = e["intrinsics"], len(e["faces"]), len(e["plates"])
                db.add(row)
                db.flush()
                by_input[e["input"]] = row.id
                shown[row.id] = e["output"] or e["input"]
                if e["output"]:
                    register.record(
                        db,
                        tenant_id=tenant_id,
                        actor="system",
                        action="photo_anonymised",
                        categories=["photos", "derived_media"],
                        purpose="privacy gate: metadata, faces and plates",
                        ref=row.id,
                    )
            design = new_design(
                db, keys, tenant_id=tenant_id, project_id=project_id, contract_id=contract_id, descriptor=descriptor
            )
            sealed = vault.put_file(contract_id, model_file)
            design.object, design.file_format, design.size = sealed.object_id, model_file.suffix[1:], sealed.size
            segments = [s.model_copy(update={"image": by_input[s.image]}) for s in ref.segments]
            job = Job(
                tenant_id=tenant_id,
                project_id=project_id,
                kind="plan",
                state=JobState.QUEUED,
                pipeline_version=PIPELINE_VERSION,
                inputs={
                    "design_id": design.id,
                    "reference": ScaleReference(segments=segments, markers=ref.markers).model_dump(mode="json"),
                    "placement": placement.model_copy(
                        update={"image": by_input[placement.image] if placement.image else None}
                    ).model_dump(mode="json"),
                },
                timings={"anonymise": gate_s},
                stage_attempts=gate_attempts,
            )
            db.add(job)
            db.flush()
            job_id = job.id
        progress(f"job {job_id[:8]} queued")

        # 2-4. The job, through the one driver, built in the out folder.
        run_project_job(
            settings,
            factory,
            vault,
            job_id,
            target=Target(run_dir=out, names=shown, progress=progress, sub_progress=sub_progress),
        )
    with factory() as db:
        ended = db.get(Job, job_id)
        assert ended is not None
        if ended.state != JobState.DONE:
            raise JobFailed(ended.error or f"the job ended {ended.state}")
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report
