"""API benchmark against the real server (`siteplan serve`, uvicorn) on loopback.

1. 20 concurrent tus uploads of 12 MB photos: the server's resident memory growth (sampled from
   /proc while they run) and the throughput, side by side with `cp` writing the same bytes to the
   same disk in the same run (the peer the issue names).
2. Read endpoints under 50 concurrent clients: p50/p99 latency.

The server runs with anonymisation off (SITEPLAN_INGEST_WORKERS=0) so the upload path is
measured alone; the privacy gate has its own benchmark (bench/anonymize.py).

Run: .venv/bin/python bench/api.py [--uploads 20] [--size-mb 12] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SITEPLAN = Path(sys.executable).parent / "siteplan"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def fake_photo(size: int) -> bytes:
    # JPEG magic then incompressible bytes: the server sniffs the type while streaming; the
    # privacy gate is off for this run, so the pixels are never decoded.
    return b"\xff\xd8\xff\xe0" + secrets.token_bytes(size - 4)


async def upload(client: httpx.AsyncClient, pid: str, data: bytes) -> None:
    r = await client.post(
        f"/v1/projects/{pid}/uploads", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data))}
    )
    r.raise_for_status()

    async def body():  # type: ignore[no-untyped-def]
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    r = await client.patch(
        r.headers["Location"],
        content=body(),
        headers={
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(len(data)),
        },
    )
    assert r.status_code == 204, r.text


async def uploads(base: str, token: str, pid: str, photos: list[bytes]) -> float:
    async with httpx.AsyncClient(
        base_url=base,
        headers={"Authorization": f"Bearer {token}"},
        timeout=300,
        limits=httpx.Limits(max_connections=len(photos)),
    ) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(upload(client, pid, p) for p in photos))
        return time.perf_counter() - t0


async def reads(base: str, token: str, paths: list[str], clients: int, per_client: int) -> list[float]:
    lat: list[float] = []
    async with httpx.AsyncClient(
        base_url=base,
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
        limits=httpx.Limits(max_connections=clients),
    ) as client:

        async def one(k: int) -> None:
            for i in range(per_client):
                t = time.perf_counter()
                r = await client.get(paths[(k + i) % len(paths)])
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(one(k) for k in range(clients)))
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--size-mb", type=float, default=12)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="read requests per client")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-api-", dir=ROOT / ".bench" if (ROOT / ".bench").is_dir() else None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {
        "SITEPLAN_DATA_DIR": str(work / "data"),
        "SITEPLAN_PORT": str(port),
        "SITEPLAN_INGEST_WORKERS": "0",
        "SITEPLAN_RUN_JOBS": "false",
        "SITEPLAN_RATE_LIMIT_PER_MINUTE": "1000000",
        "SITEPLAN_RATE_LIMIT_BURST": "1000000",
    }

    def cli(*args: str) -> dict:  # type: ignore[type-arg]
        return json.loads(
            subprocess.run([str(SITEPLAN), *args], env=env, capture_output=True, text=True, check=True).stdout
        )

    tenant = cli("tenant", "create", "Bench", "--with-contract")
    token = cli("token", "create", "--tenant", tenant["tenant_id"], "--scopes", "upload,read")["token"]
    server_log = open(work / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([str(SITEPLAN), "serve"], env=env, stdout=server_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        h = {"Authorization": f"Bearer {token}"}
        pid = httpx.post(
            f"{base}/v1/projects", json={"contract_id": tenant["contract_id"], "reference": "b"}, headers=h
        ).json()["id"]
        # Warm the upload path once so imports and first-use allocations are not counted as growth.
        asyncio.run(uploads(base, token, pid, [fake_photo(2 * 2**20)]))
        size = int(a.size_mb * 2**20)
        photos = [fake_photo(size) for _ in range(a.uploads)]
        total = size * a.uploads

        # Peer: cp of the same bytes, same disk, same run.
        src = work / "cp-src"
        dst = work / "cp-dst"
        src.mkdir()
        dst.mkdir()
        for i, p in enumerate(photos):
            (src / f"{i}.jpg").write_bytes(p)
        os.sync()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(src) + "/.", str(dst)], check=True)
        os.sync()
        cp_s = time.perf_counter() - t0
        shutil.rmtree(src)
        shutil.rmtree(dst)

        base_rss = rss_mb(server.pid)
        peak = [base_rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(server.pid))
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        cpu0 = cpu_s(server.pid)
        up_s = asyncio.run(uploads(base, token, pid, photos))
        up_cpu = cpu_s(server.pid) - cpu0
        os.sync()
        up_sync_s = time.perf_counter()
        stop.set()
        th.join()

        items = httpx.get(f"{base}/v1/projects/{pid}/photos", params={"limit": 5}, headers=h).json()["items"]
        paths = [f"/v1/projects/{pid}", f"/v1/projects/{pid}/photos", "/v1/tenant"] + [
            f"/v1/photos/{p['id']}" for p in items
        ]
        cpu0, ccpu0 = cpu_s(server.pid), time.process_time()
        t0 = time.perf_counter()
        lat_s = sorted(asyncio.run(reads(base, token, paths, a.clients, a.requests)))
        read_wall, read_cpu = time.perf_counter() - t0, cpu_s(server.pid) - cpu0
        client_cpu = time.process_time() - ccpu0
        p50 = statistics.median(lat_s) * 1000
        p99 = lat_s[int(0.99 * (len(lat_s) - 1))] * 1000
        del up_sync_s

        print(f"uploads: {a.uploads} x {a.size_mb:.0f} MB concurrently over tus, sealed with AES-GCM on arrival")
        print(
            f"  server RSS: {base_rss:.0f} MB before, peak {peak[0]:.0f} MB, growth {peak[0] - base_rss:.0f} MB"
            " (target < 100 MB)"
        )
        print(f"  siteplan: {total / 2**20 / up_s:7.1f} MB/s  ({up_s:.2f} s wall, server CPU {up_cpu:.2f} s;"
              " the HTTP client shares the 2 cores)")
        print(f"  cp      : {total / 2**20 / cp_s:7.1f} MB/s  ({cp_s:.2f} s, same bytes, same disk)")
        print(f"  ratio cp/siteplan time: {up_s / cp_s:.2f}x (target <= 2x)")
        print(f"reads: {a.clients} concurrent clients x {a.requests} GETs on {len(paths)} endpoints (SQLite)")
        print(f"  p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 < 50 ms); {len(lat_s) / read_wall:.0f} req/s,"
              f" CPU per request: server {1000 * read_cpu / len(lat_s):.2f} ms, client {1000 * client_cpu / len(lat_s):.2f} ms")
    finally:
        server.terminate()
        server.wait(30)
        sys.stderr.write((work / "server.log").read_text()[-2000:])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
