"""pycolmap's glog catches SIGTERM at import; a process that imports it through
reconstruct.colmap keeps its own SIGTERM handling (a graceful shutdown), one that imports it
plainly does not (the control: proves the check can fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

SCRIPT = """
import os, signal, sys, time
def graceful(signum, frame):
    print("graceful shutdown", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, graceful)
{importer}
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running", flush=True)
"""


@pytest.mark.parametrize(
    ("importer", "graceful"),
    [
        ("from reconstruct.colmap import import_pycolmap; import_pycolmap(); import reconstruct.sfm", True),
        ("import pycolmap", False),
    ],
)
def test_sigterm_reaches_the_process_own_handler(importer: str, graceful: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(importer=importer)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if graceful:
        assert out.returncode == 0 and "graceful shutdown" in out.stdout, out.stderr[-2000:]
        assert "Aborted" not in out.stderr
    else:
        assert "graceful shutdown" not in out.stdout and out.returncode != 0
