"""A restart of `siteplan serve` (SIGTERM, as systemd, Kubernetes or a deploy send it) lets the
upload in flight finish and shuts every worker process down through its own shutdown path."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.server import cli, serve, server_env


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_the_upload_in_flight_finish(tmp_path: Path, workers: int) -> None:
    env = server_env(tmp_path / "data", ingest_workers="0", run_jobs="false")
    tenant = cli(env, "tenant", "create", "Acme Gates", "--with-contract")
    token = cli(env, "token", "create", "--tenant", tenant["tenant_id"], "--scopes", "upload,read")["token"]
    with serve(env, tmp_path / "server.log", "--workers", str(workers)) as srv:
        http = httpx.Client(base_url=srv.base, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        pid = http.post("/v1/projects", json={"contract_id": tenant["contract_id"], "reference": "r"}).json()["id"]
        data = b"\xff\xd8\xff\xe0" + os.urandom(3 * 2**20 - 4)
        tus = {"Tus-Resumable": "1.0.0"}
        loc = http.post(f"/v1/projects/{pid}/uploads", headers=tus | {"Upload-Length": str(len(data))}).headers[
            "Location"
        ]
        started = threading.Event()

        def slow() -> Iterator[bytes]:  # a phone on a poor connection: ~2.5 s for 3 MB
            for i in range(0, len(data), 256 * 1024):
                yield data[i : i + 256 * 1024]
                started.set()
                time.sleep(0.2)

        result: dict[str, object] = {}

        def upload() -> None:
            try:
                result["r"] = http.patch(
                    loc,
                    content=slow(),
                    headers=tus
                    | {
                        "Upload-Offset": "0",
                        "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(len(data)),
                    },
                )
            except httpx.HTTPError as exc:
                result["error"] = exc

        th = threading.Thread(target=upload)
        th.start()
        assert started.wait(30)
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        th.join(60)
        assert "error" not in result, result
        r = result["r"]
        assert isinstance(r, httpx.Response) and r.status_code == 204, r
        assert r.headers["Upload-Offset"] == str(len(data))
        # uvicorn re-raises the signal once it has shut down (one process); its supervisor exits 0.
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
        # No process died in glog's signal handler (it prints "*** SIGTERM received ... Aborted").
        assert "Aborted" not in srv.text() and "SIGTERM" not in srv.text(), srv.text()[-3000:]
