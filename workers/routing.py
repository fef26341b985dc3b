"""Resource routing of stage tasks.

- GPU-capable stages (face detection through onnxruntime CUDA, PatchMatch dense stereo,
  rendering) ask for a GPU when the cluster has one, and fall back to CPU when it has none.
- CPU stages ask for the custom resource ``siteplan_cpu``, which only CPU worker nodes declare
  (docs/operations.md): so they never take a GPU node's CPUs away from its GPU stages. Where no
  node declares it (a laptop, a plain local Ray), they just ask for CPUs.
- Interactive work and batch work are kept apart by the drivers: the API runs only interactive
  plan jobs, ``siteplan reprocess`` runs batches one job at a time (bounded concurrency).
"""

from __future__ import annotations

from typing import Any, Literal

import ray

CPU_RESOURCE = "siteplan_cpu"
Kind = Literal["cpu", "gpu"]


def stage_options(kind: Kind, *, num_cpus: float = 1, memory_mb: int | None = None) -> dict[str, Any]:
    """``.options(**stage_options(...))`` for a stage task, from what the cluster has right now."""
    have = ray.cluster_resources()
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if memory_mb:
        opts["memory"] = memory_mb * 2**20
    if kind == "gpu" and have.get("GPU", 0) >= 1:
        opts["num_gpus"] = 1
        return opts
    if have.get(CPU_RESOURCE, 0) > 0:
        opts["resources"] = {CPU_RESOURCE: 1}
    return opts


def on_gpu() -> bool:
    """Inside a task: was a GPU assigned to it? (Stages pick the CUDA provider or PatchMatch then.)"""
    return bool(ray.get_gpu_ids())
