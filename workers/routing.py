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

import contextlib
from typing import Any, Literal

import ray

CPU_RESOURCE = "siteplan_cpu"
BATCH_RESOURCE = "siteplan_batch"  # slots for batch work, declared per node (1 on a laptop)
# Memory each stage task reserves (Ray's `memory` resource: a node never takes on more than it
# holds; an OOM kill is what it prevents). Measured peaks, with headroom: a 48 MP photo through
# the gate 0.5 GB (int8 faces); fountain-P11 at full size through SfM and the dense surface
# 1.3 GB; a 12 MP montage with a 200k-triangle design 1.6 GB (docs/privacy.md, docs/plan.md).
STAGE_MEMORY_MB = {"anonymise": 1024, "reconstruct": 3072, "plan": 2048}
Kind = Literal["cpu", "gpu"]
Pool = Literal["interactive", "batch"]


def stage_options(
    kind: Kind, *, pool: Pool = "interactive", num_cpus: float = 1, memory_mb: int | None = None
) -> dict[str, Any]:
    """``.options(**stage_options(...))`` for a stage task, from what the cluster has right now.

    Batch work (``pool="batch"``) takes a ``siteplan_batch`` slot instead of CPUs where the
    cluster declares slots, and runs in worker processes of its own at the idle CPU class: it
    never holds a CPU slot, nor a worker process, a designer's job is waiting for.

    Why its own processes: Ray's workers are generic, so without a distinct runtime env a 0-CPU
    batch task is leased one of the interactive job's workers, and the designer's tasks then
    queue behind batch tasks in that process (bench/pool.py measured +265 % on an interactive
    job that way; +4 % with the batch in its own idle-class workers)."""
    have = ray.cluster_resources()
    if pool == "batch" and have.get(BATCH_RESOURCE, 0) > 0:
        batch: dict[str, Any] = {"num_cpus": 0, "resources": {BATCH_RESOURCE: 1}}
        if memory_mb:
            batch["memory"] = memory_mb * 2**20
        if kind == "gpu" and have.get("GPU", 0) >= 1:
            batch["num_gpus"] = 1
        return batch_options(batch)
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if memory_mb:
        opts["memory"] = memory_mb * 2**20
    if kind == "gpu" and have.get("GPU", 0) >= 1:
        opts["num_gpus"] = 1
        return batch_options(opts) if pool == "batch" else opts
    if have.get(CPU_RESOURCE, 0) > 0:
        opts["resources"] = {CPU_RESOURCE: 1}
    return batch_options(opts) if pool == "batch" else opts


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
    """First line of every stage task: a batch worker drops to the idle CPU class, so it runs only
    on cycles interactive work leaves. (Ray already starts every worker at nice 15, so nice alone
    would leave a batch a third of a core against a designer's job: bench/pool.py measured +39 %
    at equal priority, +4 % in the idle class.)

    Linux schedules threads, and a thread pool (onnxruntime's, OpenCV's) started by an earlier
    task does not inherit a later change, so every thread of the process is moved, on each call
    (cheap: a handful of syscalls)."""
    import os

    if os.environ.get(BATCH_ENV) != "batch":
        return
    if os.getpriority(os.PRIO_PROCESS, 0) < 19:
        os.nice(19 - os.getpriority(os.PRIO_PROCESS, 0))
    if not (hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")):
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that has just exited
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
