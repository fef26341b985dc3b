"""API benchmark against the real server (`siteplan serve`, uvicorn) on loopback.

1. 20 concurrent tus uploads of 12 MB photos: the server's resident memory growth (sampled from
   /proc while they run) and the throughput. Each round runs, side by side: `cp` of the same
   bytes to the same disk with an fsync of each copy (the peer the issue names), siteplan, and
   two floors on the same uvicorn: an app that drops the body, and one that stores it with the
   vault as siteplan does but has no framework, authentication or database. One `curl -Z`
   process sends every upload. The ratio is of the medians over the rounds.
2. Read endpoints under 50 concurrent clients: p50/p99 latency.

The server runs with anonymisation off (SITEPLAN_INGEST_WORKERS=0) so the upload path is
measured alone; the privacy gate has its own benchmark (bench/anonymize.py).

Run: .venv/bin/python bench/api.py [--uploads 20] [--size-mb 12] [--rounds 3] [--clients 50] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SITEPLAN = Path(sys.executable).parent / "siteplan"


def tree_rss_mb(pid: int) -> float:
    """Resident memory of the server and its worker processes (MB)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def server_cpu(pid: int) -> float:
    """CPU seconds of the server and its worker processes."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


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


def curl_parallel(urls: list[str], files: list[Path], headers: dict[str, str]) -> float:
    """PATCH each file to its URL with one curl process running every transfer at once (``-Z``):
    a load generator in C that costs the 2 shared cores little, so the server is what is
    measured. (One curl process per photo spent ~0.2 s of CPU starting 20 processes: at 240 MB
    that alone capped the measured rate near 800 MB/s.) Returns the wall time; asserts all 204."""
    args = [
        "-sS",
        "--no-progress-meter",
        "-Z",
        "--parallel-immediate",
        "--parallel-max",
        str(len(files)),
        "-X",
        "PATCH",
        "-H",
        "Expect:",
    ]
    args += ["-w", "%{http_code}\\n"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    for f, u in zip(files, urls, strict=True):
        args += ["-o", "/dev/null", "-T", str(f), u]
    t0 = time.perf_counter()
    out = subprocess.run(["curl", *args], stdout=subprocess.PIPE, text=True, check=True).stdout
    elapsed = time.perf_counter() - t0
    codes = out.split()
    assert codes == ["204"] * len(files), codes
    return elapsed


def timed_uploads(server_pid: int, urls: list[str], files: list[Path], headers: dict[str, str]) -> tuple[float, float]:
    """:func:`curl_parallel` against one server: (wall s, that server's CPU s)."""
    cpu0 = server_cpu(server_pid)
    wall = curl_parallel(urls, files, headers)
    return wall, server_cpu(server_pid) - cpu0


def create_uploads(base: str, token: str, pid: str, files: list[Path]) -> tuple[list[str], dict[str, str]]:
    """The tus creation POSTs, one per file (untimed); returns the upload URLs and the PATCH headers."""
    h = {"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
    urls = []
    for f in files:
        r = httpx.post(f"{base}/v1/projects/{pid}/uploads", headers=h | {"Upload-Length": str(f.stat().st_size)})
        r.raise_for_status()
        urls.append(base + r.headers["Location"] if r.headers["Location"].startswith("/") else r.headers["Location"])
    return urls, h | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}


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


class RawClient:
    """A minimal keep-alive HTTP/1.1 GET client on asyncio streams. httpx costs ~6 ms of CPU per
    request, which on this 2-core machine would measure the load generator, not the server."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {self.token}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status


async def reads(port: int, token: str, paths: list[str], clients: int, per_client: int, period_s: float) -> list[float]:
    """``clients`` connections; each sends ``per_client`` GETs, one every ``period_s`` (0: back to back)."""
    lat: list[float] = []

    async def one(k: int) -> None:
        c = RawClient(port, token)
        await asyncio.sleep(period_s * k / clients)  # spread the clients over one period
        nxt = time.perf_counter()
        for i in range(per_client):
            t = time.perf_counter()
            status = await c.get(paths[(k + i) % len(paths)])
            lat.append(time.perf_counter() - t)
            assert status == 200, status
            nxt += period_s
            if period_s:
                await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    await asyncio.gather(*(one(k) for k in range(clients)))
    return lat


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
"""

# The floor with storage: the same uvicorn, and the vault's own upload appender as siteplan uses
# it (sealed ~1 MiB at a time in worker threads, fsynced, moved into the vault), but no framework,
# no authentication, no database, no tus bookkeeping. What remains above it is siteplan's own cost.
STORE_APP = """
import itertools, os
from pathlib import Path
from starlette.concurrency import run_in_threadpool
from dataprotection.vault import FileKeyStore, Vault, upload_staging

root = Path(os.environ["STORE_DIR"])
keys = FileKeyStore(root / "keys")
keys.create("c")
vault = Vault(root / "vault", keys)
ids = itertools.count()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    length = int(dict(scope["headers"]).get(b"content-length", 0))
    if not length:  # the readiness probe
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    st = upload_staging(root / "uploads", vault, "c", f"{next(ids):032x}")
    out = await run_in_threadpool(st.appender, limit=length)
    batch, size, more = [], 0, True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
        batch.append(msg.get("body", b""))
        size += len(batch[-1])
        if size >= 2**20 or not more:
            await run_in_threadpool(out.write_many, batch)
            batch, size = [], 0
    await run_in_threadpool(lambda: out.close(last=True))
    await run_in_threadpool(st.publish, length)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
"""


@contextlib.contextmanager
def bare_uvicorn(work: Path, source: str = BARE_APP) -> Iterator[tuple[str, int]]:
    """A floor under any Python upload endpoint: uvicorn (same loop and HTTP parser) with a bare
    ASGI app (``BARE_APP`` drops the body; ``STORE_APP`` stores it). Yields (base URL, pid)."""
    name = f"floor_{len(list(work.glob('floor_*.py')))}"
    (work / f"{name}.py").write_text(source)
    (work / name).mkdir()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    srv = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"{name}:app", "--port", str(port), "--log-level", "warning"],
        cwd=work,
        env=os.environ | {"PYTHONPATH": str(ROOT), "STORE_DIR": str(work / name)},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            with contextlib.suppress(httpx.TransportError):
                httpx.get(base, timeout=1)
                break
            time.sleep(0.1)
        yield base, srv.pid
    finally:
        srv.terminate()
        srv.wait(10)


def cp_sync(src: Path, dst: Path) -> float:
    """The peer: ``cp`` the photos, then fsync each copy and the folder (``sync FILE...``), as the
    server fsyncs each upload before it answers 204. Only these files are flushed, not whatever
    else the shared machine has dirty (a global ``sync`` measured that too)."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *(str(f) for f in sorted(dst.iterdir())), str(dst)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--size-mb", type=float, default=12)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=40, help="read requests per client")
    ap.add_argument("--period", type=float, default=0.5, help="seconds between one client's polls (open loop)")
    ap.add_argument("--workers", type=int, default=1, help="server processes")
    ap.add_argument("--rounds", type=int, default=3, help="upload rounds, each side by side with cp and the floor")
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
    server = subprocess.Popen(
        [str(SITEPLAN), "serve", "--workers", str(a.workers)], env=env, stdout=server_log, stderr=subprocess.STDOUT
    )
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
        # Warm the upload path so imports and first-use allocations are not counted as growth:
        # several uploads at once, so that every worker process serves some.
        asyncio.run(uploads(base, token, pid, [fake_photo(2 * 2**20) for _ in range(4 * a.workers)]))
        size = int(a.size_mb * 2**20)
        photos = [fake_photo(size) for _ in range(a.uploads)]
        total = size * a.uploads

        src = work / "cp-src"
        dst = work / "cp-dst"
        src.mkdir()
        dst.mkdir()
        for i, p in enumerate(photos):
            (src / f"{i}.jpg").write_bytes(p)
        files = sorted(src.iterdir())
        os.sync()

        base_rss = tree_rss_mb(server.pid)
        peak = [base_rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss_mb(server.pid))
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        cpu0 = server_cpu(server.pid)
        up_s = asyncio.run(uploads(base, token, pid, photos))
        up_cpu = server_cpu(server.pid) - cpu0
        # Side by side, round by round (the disk's flush time and the machine's load vary from
        # minute to minute here): the peer, siteplan, and the bare-uvicorn floor, each round.
        cp_runs: list[float] = []
        sp_runs: list[tuple[float, float]] = []
        floor_runs: list[tuple[float, float]] = []
        store_runs: list[tuple[float, float]] = []
        with bare_uvicorn(work) as (floor_base, floor_pid), bare_uvicorn(work, STORE_APP) as (store_base, store_pid):
            for k in range(a.rounds):
                # Both keep what they wrote (the server keeps its uploads): each round writes to
                # memory the machine has not handed out yet, which costs more on this VM. The
                # order turns each round, so no one always runs last on the fullest page cache.
                urls, headers = create_uploads(base, token, pid, files)
                order = ["cp", "siteplan", "floor", "store"]
                for name in order[k % 4 :] + order[: k % 4]:
                    if name == "cp":
                        cp_runs.append(cp_sync(src, dst / str(k)))
                    elif name == "siteplan":
                        sp_runs.append(timed_uploads(server.pid, urls, files, headers))
                    elif name == "floor":
                        floor_runs.append(timed_uploads(floor_pid, [floor_base] * len(files), files, {}))
                    else:
                        store_runs.append(timed_uploads(store_pid, [store_base] * len(files), files, {}))
        stop.set()
        th.join()
        cp_s = statistics.median(cp_runs)
        curl_s = statistics.median(t for t, _ in sp_runs)
        curl_cpu = statistics.median(c for _, c in sp_runs)
        floor_s = statistics.median(t for t, _ in floor_runs)
        floor_cpu = statistics.median(c for _, c in floor_runs)
        store_s = statistics.median(t for t, _ in store_runs)
        store_cpu = statistics.median(c for _, c in store_runs)
        ratios = [t / c for (t, _), c in zip(sp_runs, cp_runs, strict=True)]

        shutil.rmtree(src)
        shutil.rmtree(dst)
        items = httpx.get(f"{base}/v1/projects/{pid}/photos", params={"limit": 5}, headers=h).json()["items"]
        paths = [f"/v1/projects/{pid}", f"/v1/projects/{pid}/photos", "/v1/tenant"] + [
            f"/v1/photos/{p['id']}" for p in items
        ]
        results = {}
        for label, period in (("polling", a.period), ("back-to-back", 0.0)):
            cpu0 = server_cpu(server.pid)
            t0 = time.perf_counter()
            lat = asyncio.run(reads(port, token, paths, a.clients, a.requests, period))
            wall = time.perf_counter() - t0
            results[label] = (lat, wall, server_cpu(server.pid) - cpu0)
        print(f"uploads: {a.uploads} x {a.size_mb:.0f} MB at once over tus, sealed with AES-GCM on arrival")
        print(
            f"  server RSS: {base_rss:.0f} MB before, peak {peak[0]:.0f} MB, growth {peak[0] - base_rss:.0f} MB"
            f" over {a.rounds + 1} rounds (target < 100 MB)"
        )
        mbs = total / 2**20

        def runs(xs: list[float]) -> str:
            return ", ".join(f"{x:.2f}" for x in xs)

        print(f"  median of {a.rounds} rounds, each: cp, siteplan and the two floors, in turn (wall s; server CPU s)")
        print(
            f"  siteplan, one curl -Z : {mbs / curl_s:7.1f} MB/s  ({curl_s:.2f} s: {runs([t for t, _ in sp_runs])};"
            f" server CPU {curl_cpu:.2f} s)"
        )
        print(
            f"  cp + fsync of copies  : {mbs / cp_s:7.1f} MB/s  ({cp_s:.2f} s: {runs(cp_runs)}; same bytes, same disk)"
        )
        print(
            f"  floor, bare uvicorn   : {mbs / floor_s:7.1f} MB/s  ({floor_s:.2f} s: "
            f"{runs([t for t, _ in floor_runs])}; server CPU {floor_cpu:.2f} s; drops the body: no storage, no"
            " encryption, no fsync)"
        )
        print(
            f"  floor, uvicorn + vault: {mbs / store_s:7.1f} MB/s  ({store_s:.2f} s: "
            f"{runs([t for t, _ in store_runs])}; server CPU {store_cpu:.2f} s; stores as siteplan does: no"
            " framework, no auth, no database)"
        )
        print(
            f"  siteplan, httpx       : {mbs / up_s:7.1f} MB/s  ({up_s:.2f} s, one round; server CPU {up_cpu:.2f} s;"
            " a Python client sharing the 2 cores)"
        )
        print(f"  ratio siteplan/cp time: {curl_s / cp_s:.2f}x (medians); per round {runs(ratios)} (target <= 2x)")
        print(
            f"reads: {a.clients} concurrent clients x {a.requests} GETs over {len(paths)} endpoints, SQLite,"
            f" {a.workers} server process(es)"
        )
        for label, (lat, wall, cpu) in results.items():
            print(
                f"  {label:<13} p50 {pct(lat, 0.5):6.1f} ms  p99 {pct(lat, 0.99):6.1f} ms  {len(lat) / wall:5.0f} req/s"
                f"  server CPU {1000 * cpu / len(lat):.2f} ms/request"
            )
        print(
            "  (target: p99 < 50 ms; 'polling' = each client asks every "
            f"{a.period:g} s, as the app's job progress poll does)"
        )
    finally:
        server.terminate()
        server.wait(30)
        sys.stderr.write((work / "server.log").read_text()[-2000:])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
