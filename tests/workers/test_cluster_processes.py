"""A real multi-process Ray cluster, as operators run one: a head and worker nodes started with
`ray start` (through deploy/ray-node.sh, the script the launcher configs and images use) as
separate processes with token auth, `siteplan serve` joining it through SITEPLAN_RAY_ADDRESS, the
data folder shared by path. A plan job through the API: a GPU-capable stage routed while no GPU
node is up runs on the siteplan_cpu node; once a (fake) GPU node has joined, the next stage lands
on it; that node's raylet is killed mid-stage and a replacement joins (as KubeRay or the
autoscaler would start one): the job completes once, its attempts recorded, nothing left of the
killed attempt. (The API's job has no CPU-only stage: reconstruct and plan are both GPU-capable,
so a CPU node takes them only while no GPU node is up: workers/routing.py.)

Run as root with `ip`, each node is in its own network namespace with its own address on a
bridge (the API and the test's drivers run in the head's); otherwise all nodes share this host's
address (separate processes, one address), and the test says which it ran with."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api.server import cli, free_port, server_env, wait_healthy
from tests.api.test_real_server import _upload

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
RAY_NODE = ROOT / "deploy" / "ray-node.sh"
# Six of the fountain's photos (the reference and the placement are on 0000.jpg): enough for a
# site, and a job short enough to run twice in the test's budget on two cores.
PHOTOS = [SAMPLE / "photos" / f"{i:04d}.jpg" for i in range(6)]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    temp: Path
    log: Path

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def raylet(self) -> psutil.Process:
        found = [p for p in self.descendants() if p.name() == "raylet"]
        assert len(found) == 1, (self.name, [p.name() for p in self.descendants()])
        return found[0]

    def stop(self) -> None:
        """`ray start --block` drains and stops its node on SIGTERM; what is left is killed."""
        left = self.descendants()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


class Network:
    """Each node in its own network namespace with its own address, on a bridge of this host
    (root and `ip` needed): the nodes reach one another only through their addresses, as
    separate machines would. The data folder stays shared by path (one file system)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        third = next(n for n in range(17, 250) if f"10.251.{n}." not in used)
        self.prefix, self.tag = f"10.251.{third}", tag
        self.bridge = f"spbr{tag}"
        self.namespaces: list[str] = []
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def add(self) -> tuple[str, str]:
        """A new namespace and its address."""
        i = len(self.namespaces)
        ns, host_end, ns_end = f"spc{self.tag}{i}", f"vh{self.tag}{i}", f"vn{self.tag}{i}"
        addr = f"{self.prefix}.{i + 2}"
        self._ip("netns", "add", ns)
        self.namespaces.append(ns)
        self._ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        self._ip("link", "set", ns_end, "netns", ns)
        self._ip("link", "set", host_end, "master", self.bridge)
        self._ip("link", "set", host_end, "up")
        self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
        self._ip("-n", ns, "link", "set", ns_end, "up")
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ns, "route", "add", "default", "via", f"{self.prefix}.1")
        return ns, addr

    def close(self) -> None:
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)


def can_use_netns() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"spprobe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return made


@dataclass
class RayCluster:
    root: Path
    token: str
    net: Network | None = None
    port: int = field(default_factory=free_port)
    nodes: list[Node] = field(default_factory=list)
    head_ns: str | None = None
    head_ip: str = "127.0.0.1"
    addresses: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def on_head(self, argv: list[str]) -> list[str]:
        """A command run on the head's host (a driver needs a raylet of its own host)."""
        return ["ip", "netns", "exec", self.head_ns, *argv] if self.head_ns else argv

    def start(self, name: str, *args: str, **settings: str) -> Node:
        temp = self.root / name  # short: Ray's socket paths must stay under 107 bytes
        log = self.root / f"{name}.log"
        env = self.env() | {"SITEPLAN_RAY_TEMP": str(temp), "SITEPLAN_NODE_BLOCK": "1"} | settings
        argv = ["bash", str(RAY_NODE), *args, f"--dashboard-agent-listen-port={free_port()}"]
        if self.net is not None:
            ns, addr = self.net.add()
            env["SITEPLAN_NODE_IP"] = addr
            argv = ["ip", "netns", "exec", ns, *argv]
            if args[0] == "head":
                self.head_ns, self.head_ip = ns, addr
            self.addresses[name] = addr
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(name, proc, temp, log)
        self.nodes.append(node)
        return node

    def worker(self, name: str, gpus: int) -> Node:
        return self.start(name, "worker", self.address, SITEPLAN_NODE_GPUS=str(gpus), SITEPLAN_NODE_CPUS="1")

    def alive(self) -> list[dict]:  # type: ignore[type-arg]
        """The cluster's live nodes as its GCS reports them (a driver of its own, in a subprocess)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'resources': n['Resources']}"
            " for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            self.on_head([sys.executable, "-c", code]),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def wait_for(self, predicate, what: str, timeout: float = 90) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.alive()
            if predicate(nodes):
                return nodes
            assert time.monotonic() < deadline, f"{what}: {nodes}"
            time.sleep(1)


@contextlib.contextmanager
def ray_cluster() -> Iterator[RayCluster]:
    root = Path(tempfile.mkdtemp(prefix="spc-", dir="/tmp"))
    net = Network() if can_use_netns() else None
    c = RayCluster(root, secrets.token_hex(32), net)
    try:
        yield c
    finally:
        # All nodes drain at once (each `ray start --block` takes up to 30 s on SIGTERM).
        with ThreadPoolExecutor(max_workers=len(c.nodes) or 1) as pool:
            list(pool.map(Node.stop, c.nodes))
        if net is not None:
            net.close()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def serve_on_head(ray: RayCluster, env: dict[str, str], log: Path) -> Iterator[str]:
    """`siteplan serve` on the head's host, bound to its address; yields the base URL."""
    env = env | {"SITEPLAN_HOST": ray.head_ip}
    base = f"http://{ray.head_ip}:{env['SITEPLAN_PORT']}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ray.on_head([str(Path(sys.executable).parent / "siteplan"), "serve"]),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(base, proc, log)
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def gpu_ids(nodes: list[dict]) -> set[str]:  # type: ignore[type-arg]
    return {n["id"] for n in nodes if n["resources"].get("GPU", 0) >= 1}


def cpu_ids(nodes: list[dict]) -> set[str]:  # type: ignore[type-arg]
    return {n["id"] for n in nodes if n["resources"].get("siteplan_cpu", 0) >= 1}


def stage_attempts(data: Path, job_id: str) -> dict[str, int]:
    """The job row's attempt counts per stage (the API does not show them; the operator's DB does)."""
    from siteplan.db import Job, init_db

    factory = init_db(f"sqlite:///{data / 'siteplan.db'}")
    try:
        with factory() as db:
            job = db.get(Job, job_id)
            assert job is not None
            return dict(job.stage_attempts or {})
    finally:
        factory.kw["bind"].dispose()


def markers(attempts: Path) -> set[str]:
    with contextlib.suppress(FileNotFoundError):
        return {p.name for p in attempts.iterdir()}
    return set()


@pytest.mark.slow
def test_a_plan_job_on_a_real_ray_cluster_survives_a_killed_raylet(tmp_path: Path) -> None:
    """One job, three moments: reconstruct starts while only the CPU node is up (the GPU-capable
    stage falls back to siteplan_cpu); a GPU node joins, and the plan stage lands on it; that
    node's raylet is killed mid-plan and a replacement joins; the plan reruns there, once."""
    t_start = time.monotonic()
    with ray_cluster() as ray:
        ray.start("head", "head", SITEPLAN_RAY_PORT=str(ray.port))
        ray.worker("cpu", gpus=0)
        nodes = ray.wait_for(lambda ns: len(ns) == 2, "head and the CPU worker")
        (cpu_node,) = cpu_ids(nodes)
        mode = "own network namespaces" if ray.net else "one address"
        print(f"cluster up: {time.monotonic() - t_start:.1f} s, nodes on {mode}")
        if ray.net is not None:  # each node announces, and is reached at, its own address
            assert sorted(n["ip"] for n in nodes) == sorted(ray.addresses.values())
        # A driver without the right token is turned away.
        no_token = subprocess.run(
            ray.on_head([sys.executable, "-c", f"import ray; ray.init(address={ray.address!r})"]),
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong" * 8},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert no_token.returncode != 0 and "token" in no_token.stderr.lower()

        data = tmp_path / "data"
        env = server_env(data) | ray.env() | {"SITEPLAN_RAY_ADDRESS": ray.address}
        tenant = cli(env, "tenant", "create", "Acme Gates", "--with-contract")
        token = cli(env, "token", "create", "--tenant", tenant["tenant_id"], "--scopes", "upload,read")["token"]
        server_log = tmp_path / "server.log"
        with (
            serve_on_head(ray, env, server_log) as base,
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http,
        ):
            r = http.post("/v1/projects", json={"contract_id": tenant["contract_id"], "reference": "site"})
            pid = r.json()["id"]
            ids = {p.name: _upload(http, pid, p.read_bytes()) for p in PHOTOS}
            desc = json.loads((SAMPLE / "design" / "gate.json").read_text())
            desc.pop("file")
            design_id = http.post(f"/v1/projects/{pid}/designs", json={"descriptor": desc}).json()["id"]
            glb = (SAMPLE / "design" / "gate.glb").read_bytes()
            r = http.put(f"/v1/designs/{design_id}/file", content=glb, headers={"Content-Type": "model/gltf-binary"})
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 300
            while True:
                photos = http.get(f"/v1/projects/{pid}/photos", params={"limit": 50}).json()["items"]
                if all(p["state"] in ("anonymised", "rejected") for p in photos):
                    break
                assert time.monotonic() < deadline, photos
                time.sleep(1)
            ref = json.loads((SAMPLE / "reference.json").read_text())
            for seg in ref["segments"]:
                seg["image"] = ids[seg["image"]]
            place = json.loads((SAMPLE / "placement.json").read_text())
            place["image"] = ids[place["image"]]
            body = {"design_id": design_id, "reference": ref, "placement": place}

            r = http.post(f"/v1/projects/{pid}/jobs", json=body, headers={"Idempotency-Key": "plan-1"})
            assert r.status_code == 202, r.text
            job = r.json()
            attempts = data / "scratch" / job["id"] / "attempts"
            seen: set[str] = set()
            gpu_a: Node | None = None
            gpu_node = ""
            killed_pids: list[int] = []
            t_job = time.monotonic()
            deadline = time.monotonic() + 400
            while job["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, (job, server_log.read_text(errors="replace")[-3000:])
                seen |= markers(attempts)
                if gpu_a is None and any(m.startswith("reconstruct.") for m in seen):
                    # Reconstruct was routed with no GPU in the cluster: it runs on the CPU node.
                    # Now a GPU node joins, before the plan stage is routed.
                    gpu_a = ray.worker("gpu-a", gpus=1)
                    (gpu_node,) = gpu_ids(ray.wait_for(lambda ns: len(gpu_ids(ns)) == 1, "the GPU node", timeout=60))
                    early = [m for m in markers(attempts) if m.startswith("plan.")]
                    assert job_state(http, job) == "running" and not early, "reconstruct ended before the GPU joined"
                if gpu_a is not None and not killed_pids and any(m.startswith("plan.") for m in seen):
                    time.sleep(1)  # into the stage: loading the site, rendering the montages
                    killed_pids = [p.pid for p in gpu_a.descendants() if p.name() != "raylet"]
                    gpu_a.raylet().kill()  # the node is lost mid-stage ...
                    ray.worker("gpu-b", gpus=1)  # ... and a replacement joins, as KubeRay would start one
                time.sleep(0.2)
                job = http.get(f"/v1/jobs/{job['id']}").json()
            print(f"job: {time.monotonic() - t_job:.1f} s")
            assert job["state"] == "done", (job, server_log.read_text(errors="replace")[-3000:])
            recon = [m for m in seen if m.startswith("reconstruct.")]
            plans = sorted((m for m in seen if m.startswith("plan.")), key=lambda m: int(m.split(".")[3]))
            assert len(recon) == 1 and len(plans) == 2, seen
            assert node_of(recon[0]) == cpu_node, "no GPU up: the GPU-capable stage ran on the siteplan_cpu node"
            # The GCS marks a killed raylet dead only after its heartbeats time out (~13 s here):
            # a job that finishes sooner still sees it listed alive.
            alive = ray.wait_for(lambda ns: gpu_node not in gpu_ids(ns), "the killed GPU node marked dead", timeout=90)
            gpu_now = gpu_ids(alive)
            if ray.net is not None:
                assert len({n["ip"] for n in alive}) == len(alive) == 3  # head, CPU node, replacement GPU node
            assert node_of(plans[0]) == gpu_node, "a GPU up: the plan stage ran on the GPU node"
            assert node_of(plans[1]) in gpu_now - {gpu_node}, "the retry ran on the replacement GPU node"
            assert stage_attempts(data, job["id"]) == {"plan": 2, "reconstruct": 1}
            files = http.get(f"/v1/jobs/{job['id']}/plan").json()["files"]
            names = [f["name"] for f in files]
            assert len(names) == len(set(names)) and {"plan.glb", "plan.svg", "plan.dxf"} <= set(names)
            assert http.get(next(f["url"] for f in files if f["name"] == "plan.glb")).content[:4] == b"glTF"
            # Nothing of the killed attempt is left: its node's processes are gone, no scratch stays.
            assert gpu_a is not None and gpu_a.proc.wait(60) is not None
            assert killed_pids and not [p for p in killed_pids if alive_pid(p)]
            assert not (data / "scratch" / job["id"]).exists()
    print(f"whole test: {time.monotonic() - t_start:.1f} s")
    if ray.net is not None:
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert f"spc{ray.net.tag}" not in left and ray.net.bridge not in subprocess.getoutput("ip -o link")
    assert not ray.root.exists()
    assert not any(str(ray.root) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))


def node_of(marker: str) -> str:
    return marker.split(".")[2]  # <stage>.<pid>.<node id>.<ns> (workers/tasks.py)


def job_state(http: httpx.Client, job: dict) -> str:  # type: ignore[type-arg]
    return str(http.get(f"/v1/jobs/{job['id']}").json()["state"])


def alive_pid(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
