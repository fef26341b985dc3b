"""The Kubernetes manifests in deploy/ are what Kubernetes and KubeRay accept, and agree with each
other and with the code: the RayCluster against KubeRay's own CRD schema (ray.io/v1, from
../shared/data/k8s), every core object (and each Ray pod template, as a Pod) with
kubernetes-validate in strict mode; the same data claim everywhere, every Secret reference
resolved, resources from workers/routing.py's stage reservations."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from workers.routing import CPU_RESOURCE, STAGE_MEMORY_MB

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRD = ROOT.parent / "shared" / "data" / "k8s" / "ray.io_rayclusters.yaml"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests are meant for (docs/operations.md)
DATA_PATH = "/srv/siteplan"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    (rc,) = docs(DEPLOY / "kuberay-raycluster.yaml")
    return rc


@pytest.fixture(scope="module")
def core() -> list[dict[str, Any]]:
    return docs(DEPLOY / "k8s" / "siteplan.yaml")


@pytest.fixture(scope="module")
def secrets() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs(DEPLOY / "k8s" / "secrets.example.yaml")}


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    if not CRD.is_file():
        pytest.fail(f"KubeRay's CRD is missing at {CRD}; it sits in the shared data beside the checkout")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the API server would silently prune (a structural CRD schema does not reject them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k in schema["properties"]:
                out += unknown_fields(v, schema["properties"][k], f"{where}.{k}")
            elif not schema.get("additionalProperties"):
                out.append(f"{where}.{k}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            out += unknown_fields(v, schema["additionalProperties"], f"{where}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += unknown_fields(v, schema["items"], f"{where}[{i}]")
    return out


def crd_errors(rc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rc)]
    return errors + [f"{f}: unknown field" for f in unknown_fields(rc, schema)]


def test_raycluster_passes_kuberays_crd_schema(raycluster: dict[str, Any], crd_schema: dict[str, Any]) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    assert crd_errors(raycluster, crd_schema) == []


def test_the_crd_check_refuses_broken_clusters(raycluster: dict[str, Any], crd_schema: dict[str, Any]) -> None:
    """The check above bites: a wrong type, a missing required field, a misspelt field."""
    bad = copy.deepcopy(raycluster)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in crd_errors(bad, crd_schema))
    bad = copy.deepcopy(raycluster)
    del bad["spec"]["workerGroupSpecs"][1]["groupName"]
    assert any("groupName" in e for e in crd_errors(bad, crd_schema))
    bad = copy.deepcopy(raycluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount: unknown" in e for e in crd_errors(bad, crd_schema))


def ray_pods(rc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = rc["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]})
    return pods


def test_core_objects_and_ray_pod_templates_pass_kubernetes_validate(
    core: list[dict[str, Any]], secrets: dict[str, dict[str, Any]], raycluster: dict[str, Any]
) -> None:
    kinds = {d["kind"] for d in core}
    assert kinds >= {"PersistentVolumeClaim", "ConfigMap", "Deployment", "Service"}
    for d in [*core, *secrets.values()]:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    for name, template in ray_pods(raycluster).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{name}"}, "spec": template["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    bad = copy.deepcopy(next(d for d in core if d["kind"] == "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def by_kind(core: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in core if d["kind"] == kind]


def test_every_pod_mounts_the_one_shared_data_claim(core: list[dict[str, Any]], raycluster: dict[str, Any]) -> None:
    claims = {d["metadata"]["name"]: d for d in by_kind(core, "PersistentVolumeClaim")}
    (api,) = by_kind(core, "Deployment")
    pods = {**ray_pods(raycluster), "api": api["spec"]["template"]}
    for name, pod in pods.items():
        spec = pod["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        (data,) = [m for m in c["volumeMounts"] if m["mountPath"] == DATA_PATH]
        claim = vols[data["name"]].get("persistentVolumeClaim", {}).get("claimName")
        assert claim == "siteplan-data", f"{name}: the data folder must be the shared claim, not {vols[data['name']]}"
        assert not any("emptyDir" in vols[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == DATA_PATH)
    assert claims["siteplan-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    # Ray's temp (spill can hold personal data) is local to the pod, never on the shared folder.
    for name, pod in ray_pods(raycluster).items():
        (c,) = pod["spec"]["containers"]
        temp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/srv/ray")
        assert "emptyDir" in {v["name"]: v for v in pod["spec"]["volumes"]}[temp["name"]], name


def secret_refs(obj: Any) -> list[tuple[str, str | None]]:
    """Every (secret name, key) an object refers to."""
    out: list[tuple[str, str | None]] = []
    if isinstance(obj, dict):
        if "secretKeyRef" in obj:
            out.append((obj["secretKeyRef"]["name"], obj["secretKeyRef"]["key"]))
        if "secret" in obj and "secretName" in obj["secret"]:
            out.append((obj["secret"]["secretName"], None))
        for v in obj.values():
            out += secret_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            out += secret_refs(v)
    return out


def test_secrets_cover_database_keys_and_ray_token(
    core: list[dict[str, Any]], raycluster: dict[str, Any], secrets: dict[str, dict[str, Any]]
) -> None:
    (api,) = by_kind(core, "Deployment")
    refs = secret_refs(api) + secret_refs(raycluster)
    auth = raycluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    refs.append((auth["secretName"], "auth_token"))  # KubeRay reads the token from this key
    for name, key in refs:
        assert name in secrets, f"no Secret {name}"
        if key:
            s = secrets[name]
            assert key in {**s.get("data", {}), **s.get("stringData", {})}, f"Secret {name} has no key {key}"
    env = {e["name"]: e for e in api["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SITEPLAN_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "siteplan-db"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    # The master key from a Secret, laid over the key folder; the folder is not the data folder.
    mounts = {m["mountPath"]: m for m in api["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    (cm,) = by_kind(core, "ConfigMap")
    keys_dir = cm["data"]["SITEPLAN_KEYS_DIR"]
    assert not keys_dir.startswith(DATA_PATH + "/")
    assert mounts[f"{keys_dir}/master.key"]["subPath"] == "master.key"
    # Nothing secret sits in the ConfigMap.
    assert not any(re.search(r"TOKEN|PASSWORD|DATABASE_URL|SECRET", k) for k in cm["data"])


def test_api_deployment_and_service(core: list[dict[str, Any]], raycluster: dict[str, Any]) -> None:
    (api,) = by_kind(core, "Deployment")
    (svc,) = by_kind(core, "Service")
    (cm,) = by_kind(core, "ConfigMap")
    pod = api["spec"]["template"]
    c = pod["spec"]["containers"][0]
    (line,) = c["args"]
    assert c["command"] == ["bash", "-c"]
    assert line.startswith('/opt/siteplan/deploy/ray-node.sh driver "$SITEPLAN_RAY_ADDRESS" && exec siteplan serve')
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    port = next(p for p in c["ports"] if p["name"] == svc["spec"]["ports"][0]["targetPort"])
    assert str(port["containerPort"]) == cm["data"]["SITEPLAN_PORT"]
    assert cm["data"]["SITEPLAN_HOST"] == "0.0.0.0"
    assert svc["spec"]["type"] == "ClusterIP" and raycluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cm["data"]["SITEPLAN_RAY_ADDRESS"] == f"{raycluster['metadata']['name']}-head-svc:6379"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/health"


def quantity(q: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_worker_groups_route_like_workers_routing(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head runs no stage"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    limits = {n: g["template"]["spec"]["containers"][0]["resources"]["limits"] for n, g in groups.items()}
    gpu_groups = [g for n, g in groups.items() if "nvidia.com/gpu" in limits[n]]
    cpu_groups = [g for g in groups.values() if CPU_RESOURCE in g.get("resources", {})]
    assert gpu_groups and cpu_groups and not {g["groupName"] for g in gpu_groups} & {g["groupName"] for g in cpu_groups}
    mib = 2**20
    for g in cpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], "requests = limits: Ray sees exactly what it is given"
        cpus = quantity(res["limits"]["cpu"])
        assert quantity(g["resources"][CPU_RESOURCE]) == cpus
        usable = quantity(res["limits"]["memory"]) - quantity(g["rayStartParams"]["object-store-memory"])
        # A CPU pod full of photo tasks (1 per CPU) or three reconstructs fits its memory.
        assert usable >= cpus * STAGE_MEMORY_MB["anonymise"] * mib
        assert usable >= 3 * STAGE_MEMORY_MB["reconstruct"] * mib
        assert "-gpu" not in g["template"]["spec"]["containers"][0]["image"]
    for g in gpu_groups:
        c = g["template"]["spec"]["containers"][0]
        assert quantity(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        usable = quantity(c["resources"]["limits"]["memory"]) - quantity(g["rayStartParams"]["object-store-memory"])
        assert usable >= (STAGE_MEMORY_MB["reconstruct"] + STAGE_MEMORY_MB["plan"]) * mib
        assert c["image"].endswith("-gpu"), "GPU pods run the CUDA image (make venv-gpu)"


def test_images_are_the_containerfile_targets_of_this_version(
    core: list[dict[str, Any]], raycluster: dict[str, Any]
) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (api,) = by_kind(core, "Deployment")
    images = {c["image"] for p in ray_pods(raycluster).values() for c in p["spec"]["containers"]}
    images |= {c["image"] for c in api["spec"]["template"]["spec"]["containers"]}
    assert {i.rsplit(":", 1)[1] for i in images} == {version, f"{version}-gpu"}
    targets = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", (DEPLOY / "Containerfile").read_text(), re.M | re.I)
    assert {"cpu", "gpu"} <= set(targets)


def test_only_siteplans_pods_reach_ray(core: list[dict[str, Any]], raycluster: dict[str, Any]) -> None:
    policies = {d["metadata"]["name"]: d for d in by_kind(core, "NetworkPolicy")}
    ray_labels = {"ray.io/cluster": raycluster["metadata"]["name"]}  # KubeRay's label on its pods
    (api,) = by_kind(core, "Deployment")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    ray_pol = policies["siteplan-ray"]["spec"]
    assert ray_pol["podSelector"]["matchLabels"] == ray_labels and ray_pol["policyTypes"] == ["Ingress"]
    (rule,) = ray_pol["ingress"]
    assert "ports" not in rule
    allowed = [p["podSelector"]["matchLabels"] for p in rule["from"]]
    assert all("namespaceSelector" not in p and "ipBlock" not in p for p in rule["from"])
    assert ray_labels in allowed and any(a.items() <= api_labels.items() for a in allowed)
    api_pol = policies["siteplan-api"]["spec"]
    assert api_pol["podSelector"]["matchLabels"].items() <= api_labels.items()
    open_rule = next(r for r in api_pol["ingress"] if "from" not in r)
    assert open_rule["ports"] == [{"port": "http", "protocol": "TCP"}], "only the HTTP port is open to all"
