"""Every Ray cluster launcher YAML in deploy/ is accepted by Ray's own loader, the path `ray up`
takes (prepare_config, then validate_config against Ray's schema with the provider's defaults),
and the `ray start` lines deploy/ray-node.sh writes are accepted by Ray's own CLI parser."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.scripts.scripts import start as ray_start_command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
LAUNCHER_YAMLS = sorted(DEPLOY.glob("ray-cluster*.yaml"))


def load_like_ray_up(path: Path) -> dict:
    """What `ray up` does with the file before it touches a provider (commands._bootstrap_config)."""
    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_are_launcher_yamls() -> None:
    assert {p.name for p in LAUNCHER_YAMLS} >= {"ray-cluster.yaml", "ray-cluster-aws.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_rays_loader_accepts_the_launcher_yaml(path: Path) -> None:
    config = load_like_ray_up(path)
    assert config["cluster_name"] == "siteplan"
    # Every node starts Ray through the one script, with token auth (the script refuses without).
    assert any("deploy/ray-node.sh head" in c for c in config["head_start_ray_commands"])
    assert any("deploy/ray-node.sh worker" in c for c in config["worker_start_ray_commands"])
    for cmd in config["head_setup_commands"] + config["worker_setup_commands"] + config["setup_commands"]:
        subprocess.run(["bash", "-n", "-c", cmd], check=True)


def node_setup(config: dict) -> dict[str, list[str]]:
    """The setup commands each node type runs (its own worker_setup_commands, else the global ones)."""
    out = {}
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = config["setup_commands"] + config["head_setup_commands"]
        else:
            out[name] = config["setup_commands"] + node.get("worker_setup_commands", config["worker_setup_commands"])
    return out


def test_cloud_node_types_route_like_workers_routing() -> None:
    config = load_like_ray_up(DEPLOY / "ray-cluster-aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head runs no stage"
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [n for n, t in types.items() if t["resources"].get("siteplan_cpu", 0) > 0]
    assert gpu and cpu and not set(gpu) & set(cpu), "CPU stages never take a GPU node's CPUs"
    setup = node_setup(config)
    for n in gpu:
        assert any("make venv-gpu" in c for c in setup[n]), f"{n} must run make venv-gpu"
    for n in [*cpu, config["head_node_type"]]:
        assert not any("venv-gpu" in c for c in setup[n])


def test_on_prem_yaml_picks_venv_gpu_on_gpu_hosts(tmp_path: Path) -> None:
    """The local provider has one node type, so the worker's setup line decides on the host."""
    config = load_like_ray_up(DEPLOY / "ray-cluster.yaml")
    (line,) = config["worker_setup_commands"]
    for has_gpu, target in ((True, "venv-gpu"), (False, "venv")):
        bindir = fake_bin(tmp_path / f"gpu{has_gpu}", gpus=1 if has_gpu else 0)
        (bindir / "make").write_text('#!/bin/sh\necho "make $*" >> "$LOG"\n')
        (bindir / "make").chmod(0o755)
        (bindir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (bindir / "sudo").chmod(0o755)
        log = tmp_path / f"make{has_gpu}.log"
        script = line.replace("cd /opt/siteplan", f"cd {tmp_path}")
        env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin", "LOG": str(log)}
        subprocess.run(["bash", "-c", script], check=True, env=env)
        assert log.read_text().split("\n")[:2] == ["make sysdeps", f"make {target}"]


def fake_bin(d: Path, gpus: int) -> Path:
    """A PATH folder with a fake `ray` that records its arguments and a fake nvidia-smi."""
    d.mkdir(parents=True, exist_ok=True)
    ray = d / "ray"
    ray.write_text("#!/usr/bin/env python3\nimport json, sys, os\nprint(json.dumps(sys.argv[1:]))\n")
    ray.chmod(ray.stat().st_mode | stat.S_IEXEC)
    if gpus:
        smi = d / "nvidia-smi"
        lines = "".join(f"GPU {i}: NVIDIA H100 (UUID: GPU-{i})\\n" for i in range(gpus))
        smi.write_text(f'#!/bin/sh\nprintf "{lines}"\n')
        smi.chmod(0o755)
    return d


def ray_node(tmp_path: Path, *args: str, gpus: int = 0, token: bool = True, **env: str) -> subprocess.CompletedProcess:
    bindir = fake_bin(tmp_path / f"bin{gpus}", gpus)
    full = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "SITEPLAN_RAY_BIN": str(bindir / "ray"),
        "SITEPLAN_RAY_TEMP": str(tmp_path / "ray"),
        "SITEPLAN_NODE_CPUS": "16",
        "HOME": str(tmp_path),
        **env,
    }
    if token:
        full["RAY_AUTH_TOKEN"] = "t" * 32
    return subprocess.run(
        ["bash", str(DEPLOY / "ray-node.sh"), *args], env=full, capture_output=True, text=True, check=False
    )


def parsed_start(proc: subprocess.CompletedProcess) -> dict:
    """The arguments as Ray's own `ray start` command line parser reads them."""
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)
    assert argv[0] == "start"
    ctx = ray_start_command.make_context("start", argv[1:])
    return dict(ctx.params)


def test_head_line_runs_no_stage_and_spills_under_its_temp_dir(tmp_path: Path) -> None:
    p = parsed_start(ray_node(tmp_path, "head", SITEPLAN_NODE_IP="10.0.0.10"))
    assert p["head"] and p["num_cpus"] == 0 and p["port"] == 6379
    assert p["dashboard_host"] == "10.0.0.10", "the dashboard binds the private address, never 0.0.0.0"
    assert p["temp_dir"] == str(tmp_path / "ray")
    system = p["system_config"] if isinstance(p["system_config"], dict) else json.loads(p["system_config"])
    spill = json.loads(system["object_spilling_config"])
    assert spill["params"]["directory_path"] == str(tmp_path / "ray" / "spill")


def test_gpu_host_declares_its_gpus_and_no_siteplan_cpu(tmp_path: Path) -> None:
    p = parsed_start(ray_node(tmp_path, "worker", "10.0.0.10:6379", gpus=2))
    assert p["address"] == "10.0.0.10:6379" and p["num_gpus"] == 2 and p["num_cpus"] == 16
    assert p["resources"] in (None, "{}")


def test_cpu_host_declares_siteplan_cpu(tmp_path: Path) -> None:
    p = parsed_start(ray_node(tmp_path, "worker", "10.0.0.10:6379"))
    assert p["num_gpus"] is None
    assert json.loads(p["resources"]) == {"siteplan_cpu": 16, "siteplan_batch": 1}


def test_driver_host_joins_with_nothing_to_run_stages(tmp_path: Path) -> None:
    p = parsed_start(ray_node(tmp_path, "driver", "siteplan-head-svc:6379", gpus=1))
    assert p["address"] == "siteplan-head-svc:6379" and p["num_cpus"] == 0 and p["num_gpus"] == 0
    assert p["resources"] in (None, "{}") and not p["head"]


def test_a_node_without_a_token_is_not_started(tmp_path: Path) -> None:
    proc = ray_node(tmp_path, "worker", "10.0.0.10:6379", token=False, RAY_AUTH_TOKEN_PATH=str(tmp_path / "none"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no Ray auth token" in proc.stderr
    bad = ray_node(tmp_path, "worker")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
