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
BATCH_RESOURCE = "siteplan_batch"  # slots for batch work, declared per node (1 on a laptop)
Kind = Literal["cpu", "gpu"]
Pool = Literal["interactive", "batch"]


def stage_options(
    kind: Kind, *, pool: Pool = "interactive", num_cpus: float = 1, memory_mb: int | None = None
) -> dict[str, Any]:
    """``.options(**stage_options(...))`` for a stage task, from what the cluster has right now.

    Batch work (``pool="batch"``) takes a ``siteplan_batch`` slot instead of CPUs where the
    cluster declares slots: it never holds a CPU slot a designer's job is waiting for, and at
    most one batch stage per slot runs at a time (bench/pool.py: +5 % on an interactive job).
    (Giving batch stages their own low-priority worker processes through a runtime env was
    measured worse: +208 %, see docs/workers.md.)"""
    have = ray.cluster_resources()
    if pool == "batch" and have.get(BATCH_RESOURCE, 0) > 0:
        batch: dict[str, Any] = {"num_cpus": 0, "resources": {BATCH_RESOURCE: 1}}
        if kind == "gpu" and have.get("GPU", 0) >= 1:
            batch["num_gpus"] = 1
        return batch
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
