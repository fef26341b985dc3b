"""Open a page in Debian's headless Chromium (software WebGL) and collect its console."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def open_page(page: Path, work: Path, *, shot: Path | None = None) -> tuple[list[str], str]:
    """(the console lines, Chromium's stderr tail) after the page ran, offline, for up to 40 s."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed; `make test` installs it"
    br = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader",
            "--no-first-run",
            "--disable-background-networking",
            # The network is off: no proxy answers and no host name resolves.
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={work / 'chromium'}",
            "--enable-logging=stderr",
            "--v=0",
            "--timeout=40000",
            "--window-size=1200,2400",
            f"--screenshot={shot or work / 'page.png'}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    return [ln for ln in br.stderr.splitlines() if ":CONSOLE" in ln], br.stderr[-2000:]


def assert_viewer_loaded(console: list[str], tail: str) -> None:
    """The report's 3D viewer loaded plan.glb, and nothing on the page raised."""
    assert any("plan3d loaded" in ln for ln in console), tail
    assert not [ln for ln in console if "ERROR:CONSOLE" in ln or "Uncaught" in ln], console
