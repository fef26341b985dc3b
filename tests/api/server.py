"""`siteplan serve` in a subprocess on a free loopback port, for the tests that need a real server."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

SITEPLAN = Path(sys.executable).parent / "siteplan"


def cli(env: dict[str, str], *args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([str(SITEPLAN), *args], env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    env: dict[str, str]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def server_env(data_dir: Path, **settings: str) -> dict[str, str]:
    return (
        os.environ
        | {"SITEPLAN_DATA_DIR": str(data_dir), "SITEPLAN_PORT": str(free_port())}
        | {f"SITEPLAN_{k.upper()}": v for k, v in settings.items()}
    )


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path, *args: str) -> Iterator[Server]:
    """Start the server, wait until /v1/health answers; kill it at the end if still running."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(SITEPLAN), "serve", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, f"http://127.0.0.1:{env['SITEPLAN_PORT']}", env, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{srv.base}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, srv.text()
            time.sleep(0.3)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
