"""The worker pool on a simulated multi-node cluster (ray.cluster_utils.Cluster): GPU stages on
the GPU node, CPU stages on the CPU node, CPU fallback without a GPU node, and a stage that
survives a killed worker process and a killed node with exactly one result."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from dataprotection.fields import new_project
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore
from siteplan import PIPELINE_VERSION
from siteplan.db import Job, init_db
from workers.reprocess import result_key
from workers.routing import BATCH_RESOURCE, CPU_RESOURCE, on_gpu, stage_options


@ray.remote
def where(_: int) -> dict[str, object]:
    return {"node": ray.get_runtime_context().get_node_id(), "gpu": on_gpu()}


@ray.remote(max_retries=3)
def keyed_stage(db_url: str, job_id: str, project_id: str, out: str, seconds: float, pid_file: str) -> str:
    """A stage: counts its attempt in the DB, works, then publishes a result named by its inputs."""
    factory = init_db(db_url)
    with factory.begin() as db:
        j = db.get(Job, job_id)
        assert j is not None
        j.attempts += 1
    Path(pid_file).write_text(json.dumps({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}))
    time.sleep(seconds)
    key = result_key(project_id, {"stage": "probe"}, PIPELINE_VERSION)
    tmp = Path(out) / f".tmp-{key}-{os.getpid()}"
    tmp.write_text("result")
    os.replace(tmp, Path(out) / f"{key}.json")
    return key


@pytest.fixture
def cluster() -> object:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {CPU_RESOURCE: 1}})
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_gpu_and_cpu_stages_land_on_their_nodes(cluster: Cluster) -> None:
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    head = cluster.head_node.node_id
    gpu = [ray.get(where.options(**stage_options("gpu")).remote(i)) for i in range(3)]
    cpu = [ray.get(where.options(**stage_options("cpu")).remote(i)) for i in range(3)]
    assert {g["node"] for g in gpu} == {gpu_node.node_id} and all(g["gpu"] for g in gpu)
    assert {c["node"] for c in cpu} == {head} and not any(c["gpu"] for c in cpu)


@pytest.mark.slow
def test_without_a_gpu_node_gpu_stages_run_on_cpu(cluster: Cluster) -> None:
    ray.init(address=cluster.address)
    r = ray.get(where.options(**stage_options("gpu")).remote(0), timeout=60)
    assert r["node"] == cluster.head_node.node_id and r["gpu"] is False


@pytest.mark.slow
def test_stage_survives_a_killed_worker_and_a_killed_node(cluster: Cluster, tmp_path: Path) -> None:
    # Two worker nodes that can run the stage; the head cannot (so the head is never the one killed).
    nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=1, resources={"probe": 1}) for _ in range(2))}
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    factory = init_db(db_url)
    keys = FileKeyStore(tmp_path / "keys")
    with factory.begin() as db:
        t = create_tenant(db, keys, label="x")
        c = create_contract(db, keys, tenant_id=t.id)
        p = new_project(db, keys, tenant_id=t.id, contract_id=c.id, reference="p")
        j = Job(
            tenant_id=t.id, project_id=p.id, state="running", pipeline_version=PIPELINE_VERSION, inputs={}, timings={}
        )
        db.add(j)
        db.flush()
        job_id, project_id = j.id, p.id
    out = tmp_path / "results"
    out.mkdir()
    pid_file = tmp_path / "pid.json"

    def wait_started(previous: int | None) -> dict[str, object]:
        deadline = time.monotonic() + 120
        while True:
            if pid_file.exists():
                info = json.loads(pid_file.read_text())
                if info["pid"] != previous:
                    return info
            assert time.monotonic() < deadline, "the stage did not (re)start"
            time.sleep(0.1)

    ref = keyed_stage.options(num_cpus=1, resources={"probe": 1}).remote(
        db_url, job_id, project_id, str(out), 8.0, str(pid_file)
    )
    first = wait_started(None)
    os.kill(int(first["pid"]), signal.SIGKILL)  # 1. a worker process dies mid-stage
    second = wait_started(int(first["pid"]))
    cluster.remove_node(nodes[str(second["node"])], allow_graceful=False)  # 2. its whole node dies mid-stage
    third = wait_started(int(second["pid"]))
    assert third["node"] != second["node"]
    key = ray.get(ref, timeout=180)
    assert [p.name for p in out.iterdir()] == [f"{key}.json"], "exactly one result"
    with factory() as db:
        assert db.get(Job, job_id).attempts == 3  # type: ignore[union-attr]


@ray.remote
def sched_probe() -> dict[str, object]:
    """What a stage task sees of its own process: pid, CPU class of every thread."""
    from workers.routing import enter_pool

    enter_pool()
    policies = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            policies.add(os.sched_getscheduler(int(tid)))
    return {"pid": os.getpid(), "policies": sorted(policies)}


@pytest.mark.slow
def test_batch_stages_run_in_their_own_idle_class_workers() -> None:
    """A batch stage never runs in (and never slows) a process that serves a designer's job:
    it gets worker processes of its own, every thread in the idle CPU class."""
    ray.init(num_cpus=2, resources={BATCH_RESOURCE: 1}, include_dashboard=False, log_to_driver=False)
    try:
        # Both pools reserve the stage's memory, so a node never takes on more than it holds.
        for pool in ("interactive", "batch"):
            assert stage_options("cpu", pool=pool, memory_mb=512)["memory"] == 512 * 2**20  # type: ignore[arg-type]
        inter = ray.get([sched_probe.options(**stage_options("cpu")).remote() for _ in range(6)])
        batch = ray.get([sched_probe.options(**stage_options("cpu", pool="batch")).remote() for _ in range(6)])
        inter += ray.get([sched_probe.options(**stage_options("cpu")).remote() for _ in range(6)])
    finally:
        ray.shutdown()
    assert {p["pid"] for p in inter}.isdisjoint({p["pid"] for p in batch})
    assert all(p["policies"] == [os.SCHED_IDLE] for p in batch)
    assert all(os.SCHED_IDLE not in p["policies"] for p in inter)


@pytest.mark.parametrize("depth", [1, 8, 30])
def test_ray_dir_leaves_room_for_rays_socket_paths(tmp_path: Path, depth: int) -> None:
    """Ray's sockets live at <ray dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
    and a socket path may not exceed 107 bytes, whatever the data dir's path."""
    from siteplan.settings import Settings

    root = tmp_path.joinpath(*["d" * 9] * depth)
    ray_dir = Settings(data_dir=root).ray_dir
    worst = f"{ray_dir}/session_2026-12-01_13-55-42_797116_4194304/sockets/plasma_store"
    assert len(worst.encode()) <= 107
