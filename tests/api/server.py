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


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    """Until ``base``'s /v1/health answers 200; RuntimeError with the log's tail if the process
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the server did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def serve(env: dict[str, str], log: Path, *args: str) -> Iterator[Server]:
    """Start the server, wait until /v1/health answers; kill it at the end if still running."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(SITEPLAN), "serve", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(proc, f"http://127.0.0.1:{env['SITEPLAN_PORT']}", env, log)
    try:
        wait_healthy(srv.base, proc, log)
        yield srv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
