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
    cluster declares slots, and runs in its own low-priority worker processes: it never holds a
    CPU slot a designer's job is waiting for (bench/pool.py measures it)."""
    have = ray.cluster_resources()
    if pool == "batch" and have.get(BATCH_RESOURCE, 0) > 0:
        batch: dict[str, Any] = {"num_cpus": 0, "resources": {BATCH_RESOURCE: 1}}
        if kind == "gpu" and have.get("GPU", 0) >= 1:
            batch["num_gpus"] = 1
        return batch_options(batch)
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


BATCH_ENV = "SITEPLAN_POOL"


def batch_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Mark a stage task as batch work: it runs in worker processes of its own (a distinct
    runtime env, so Ray never reuses them for interactive work) that lower their CPU priority
    (:func:`enter_pool`). A running batch then yields the cores to a designer's job at once."""
    env = dict(opts.get("runtime_env") or {})
    env["env_vars"] = {**env.get("env_vars", {}), BATCH_ENV: "batch"}
    return {**opts, "runtime_env": env}


def enter_pool() -> None:
    """First line of every stage task: a batch worker drops to the idle CPU class (once), so it
    runs only on cycles interactive work leaves. (Ray already starts every worker at nice 15, so
    nice alone would leave a batch a third of a core's share against a designer's job.)"""
    import os

    if os.environ.get(BATCH_ENV) != "batch" or getattr(enter_pool, "_done", False):
        return
    if os.getpriority(os.PRIO_PROCESS, 0) < 19:
        os.nice(19 - os.getpriority(os.PRIO_PROCESS, 0))
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    enter_pool._done = True  # type: ignore[attr-defined]
