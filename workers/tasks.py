"""Ray tasks: one per stage, each a thin wrapper over a plain stage function.

Task arguments are paths and settings, never photo bytes or personal data (Ray logs task
arguments and keeps them in its object store).

Retries: Ray re-runs a task whose worker process or node died (``max_retries``; never for the
stage's own errors, which are final). Every attempt leaves a marker in the job's attempts dir
(:func:`count_attempts`), so the job row records how often each stage ran. A retried stage
writes the same outputs under the same names (the site's are built in a staging folder and
replace the earlier ones only when all exist, site.json last) and first clears the work dirs a
killed attempt left: a finished retry leaves neither a second nor a half-written result.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray

from siteplan import PIPELINE_VERSION
from workers.routing import enter_pool, on_gpu

# Reconstruct and plan survive up to 3 lost workers or nodes (a killed worker, then a killed
# node, then one more); photos 2 each (13 of them: a retry is cheap).
STAGE_RETRIES = 3


def mark_attempt(attempts_dir: str | None, stage: str) -> None:
    """First step of a stage task: record that this attempt started (one empty file, named by
    stage, process and node: an operator can tell where a lost attempt ran)."""
    if attempts_dir:
        d = Path(attempts_dir)
        d.mkdir(parents=True, exist_ok=True)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        (d / f"{stage}.{os.getpid()}.{node}.{time.time_ns()}").touch()


def count_attempts(attempts_dir: Path) -> dict[str, int]:
    """Attempts started per stage: ``{"anonymise": 14, "reconstruct": 2}`` (14 for 13 photos: one
    photo was retried)."""
    counts: dict[str, int] = {}
    if attempts_dir.is_dir():
        for f in attempts_dir.iterdir():
            stage = f.name.split(".", 1)[0]
            counts[stage] = counts.get(stage, 0) + 1
    return dict(sorted(counts.items()))


@ray.remote(num_cpus=1, max_retries=2)
def anonymize_task(
    src: str, out_dir: str, policy: dict[str, Any], attempts_dir: str | None = None, out_name: str | None = None
) -> dict[str, Any]:
    mark_attempt(attempts_dir, "anonymise")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    enter_pool()
    from privacy.anonymize import AnonymizationPolicy, anonymize_file

    detector = None
    if on_gpu():  # Ray gave this task a GPU: the same model through onnxruntime's CUDA provider
        from privacy.faces import CenterFaceConfig, CenterFaceDetector

        gpu = CenterFaceConfig(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), precision="fp32")
        detector = CenterFaceDetector(gpu)
    return anonymize_file(
        Path(src), Path(out_dir), AnonymizationPolicy.model_validate(policy), face_detector=detector, out_name=out_name
    )


@ray.remote(max_retries=STAGE_RETRIES)
def reconstruct_task(
    image_dir: str,
    names: list[str],
    intrinsics: dict[str, dict[str, Any]],
    reference: dict[str, Any],
    run_dir: str,
    config: dict[str, Any],
    attempts_dir: str | None = None,
) -> dict[str, Any]:
    mark_attempt(attempts_dir, "reconstruct")
    enter_pool()
    from reconstruct.colmap import import_pycolmap

    pycolmap = import_pycolmap()  # before any reconstruct module: keeps Ray's SIGTERM handling
    from reconstruct.reference import ScaleReference
    from reconstruct.sfm import SfmConfig
    from reconstruct.site import reconstruct

    pycolmap.logging.minloglevel = 2
    site = reconstruct(
        Path(image_dir),
        ScaleReference.model_validate(reference),
        Path(run_dir),
        intrinsics=intrinsics,
        names=names,
        config=SfmConfig.model_validate(config),
        pipeline_version=PIPELINE_VERSION,
    )
    return site.info


@ray.remote(num_cpus=1, max_retries=STAGE_RETRIES)
def plan_task(
    run_dir: str, design: str, placement: str, out_dir: str, images_dir: str, attempts_dir: str | None = None
) -> dict[str, Any]:
    mark_attempt(attempts_dir, "plan")
    enter_pool()
    from reconstruct.colmap import import_pycolmap

    import_pycolmap()  # before any reconstruct module: keeps Ray's SIGTERM handling
    from reconstruct.plan import plan

    def progress(sub: str, fraction: float) -> None:  # read by the driver (workers.stages.StageWatch)
        tmp = Path(out_dir) / ".progress.json.tmp"
        tmp.write_text(json.dumps({"sub": sub, "fraction": round(0.3 + 0.7 * fraction, 3)}))
        tmp.replace(Path(out_dir) / ".progress.json")

    return plan(
        Path(run_dir), Path(design), Path(placement), Path(out_dir), images_dir=Path(images_dir), progress=progress
    )
