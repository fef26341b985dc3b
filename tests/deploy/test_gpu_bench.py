"""bench/gpu.sh on a machine without a GPU says so and stops cleanly, touching nothing (it never
builds .venv-gpu or runs a demo there). Where a GPU is present it is run by hand (docs/operations.md)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("smi", [None, "", "No devices were found"])
def test_without_a_gpu_it_says_so_and_stops(tmp_path: Path, smi: str | None) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "grep", "make", "cp", "date"):  # make/cp: would show up in the log
        (bindir / tool).symlink_to(f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else f"/bin/{tool}")
    if smi is not None:
        (bindir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{smi}'\nexit 0\n")
        (bindir / "nvidia-smi").chmod(0o755)
    made = [ROOT / ".venv-gpu", ROOT / "out" / "bench-gpu"]
    before = [p.exists() for p in made]
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        env={**os.environ, "PATH": str(bindir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU here" in proc.stdout and "nothing measured" in proc.stdout
    assert [p.exists() for p in made] == before, "it built or ran something"
