"""Ray tasks: one per stage, each a thin wrapper over a plain stage function.

Task arguments are paths and settings, never photo bytes or personal data (Ray logs task
arguments and keeps them in its object store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray


@ray.remote(num_cpus=1, max_retries=2)
def anonymize_task(src: str, out_dir: str, policy: dict[str, Any]) -> dict[str, Any]:
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from privacy.anonymize import AnonymizationPolicy, anonymize_file

    return anonymize_file(Path(src), Path(out_dir), AnonymizationPolicy.model_validate(policy))


@ray.remote(max_retries=1)
def reconstruct_task(
    image_dir: str,
    names: list[str],
    intrinsics: dict[str, dict[str, Any]],
    reference: dict[str, Any],
    run_dir: str,
    config: dict[str, Any],
) -> dict[str, Any]:
    import pycolmap

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
    )
    return site.info


@ray.remote(num_cpus=1, max_retries=1)
def plan_task(run_dir: str, design: str, placement: str, out_dir: str, images_dir: str) -> dict[str, Any]:
    from reconstruct.plan import plan

    return plan(Path(run_dir), Path(design), Path(placement), Path(out_dir), images_dir=Path(images_dir))
