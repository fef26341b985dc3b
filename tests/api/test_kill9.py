"""kill -9 of a real `siteplan serve` at random moments: during uploads and anonymisation, then
twice during a plan job. After each restart, within 60 s: every photo and job is resumed (held by
the new server) or finished; nothing decrypted is left under the data folder outside the scratch
of the job the new server runs (no JPEG, no design name, no SfM database); nothing is duplicated.
After the last restart the job goes on to done with one result, published once.

The server's whole process group is killed (as a container or machine crash would): Ray's
processes go with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api.server import SITEPLAN, cli, server_env, wait_healthy

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "sample_data"
DESIGN_NAME = "Poort-Janssens-Dorpstraat-7781"
TUS = {"Tus-Resumable": "1.0.0"}
RECOVER_S = 60.0


class Srv:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.out = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [str(SITEPLAN), "serve"], env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.base = f"http://127.0.0.1:{env['SITEPLAN_PORT']}"
        self.log = log
        wait_healthy(self.base, self.proc, log, 90)
        self.started = time.monotonic()

    def kill(self) -> None:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for k in kids:  # any that left the group (Ray daemons start sessions of their own)
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                k.kill()
        self.proc.wait(30)
        psutil.wait_procs(kids, timeout=30)
        self.out.close()


def _db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data / 'siteplan.db'}?mode=ro", uri=True, timeout=30)


def _rows(data: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    con = _db(data)
    try:
        return list(con.execute(sql))
    finally:
        con.close()


def _plaintext(data: Path, allowed: set[Path]) -> list[str]:
    """Files under the data folder that hold a decrypted photo, the design's name or an SfM
    database, outside the scratch directories in ``allowed`` (a job the live server runs)."""
    found = []
    for p in data.rglob("*"):
        if not p.is_file() or p.is_symlink() or any(a in p.parents for a in allowed):
            continue
        try:
            head = p.read_bytes()
        except OSError:
            continue
        if head[:3] == b"\xff\xd8\xff" or DESIGN_NAME.encode() in head or p.name == "database.db":
            found.append(str(p.relative_to(data)))
    return found


def _upload(http: httpx.Client, pid: str, data: bytes, locs: dict[str, str], name: str) -> None:
    if name not in locs:
        r = http.post(f"/v1/projects/{pid}/uploads", headers=TUS | {"Upload-Length": str(len(data))})
        assert r.status_code == 201, r.text
        locs[name] = r.headers["Location"]
    loc = locs[name]
    r = http.head(loc, headers=TUS)
    assert r.status_code == 200, (name, r.status_code)
    off = int(r.headers["Upload-Offset"])
    while off < len(data):
        r = http.patch(
            loc,
            content=data[off : off + 64 * 1024],
            headers=TUS | {"Upload-Offset": str(off), "Content-Type": "application/offset+octet-stream"},
        )
        assert r.status_code == 204, r.text
        off = int(r.headers["Upload-Offset"])


def _upload_all(base: str, token: str, pid: str, locs: dict[str, str]) -> None:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for p in sorted((SAMPLE / "photos").glob("*.jpg")):
            _upload(http, pid, p.read_bytes(), locs, p.name)


def _wait(what: str, cond, t0: float, limit: float = RECOVER_S):  # type: ignore[no-untyped-def]
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - t0 < limit, f"{what}: not within {limit:.0f} s of the restart"
        time.sleep(0.5)


def _check_after_restart(data: Path, srv: Srv, job_id: str | None) -> str | None:
    """Within 60 s: nothing left claimed by the dead server; plaintext only in the live job's
    scratch. Returns the job's state."""
    me = f":{srv.proc.pid}:"

    def settled() -> bool:
        photos = _rows(data, "select state, lease_holder from photos")
        if any(s == "anonymising" and me not in (h or "") for s, h in photos):
            return False
        if any(s == "quarantined" for s, _ in photos):
            return False
        if job_id is None:
            return True
        ((state, holder),) = _rows(data, f"select state, lease_holder from jobs where id = '{job_id}'")
        if state == "running" and me not in (holder or ""):
            return False
        return state != "queued"

    _wait("every photo and job resumed or finished", settled, srv.started)
    state = None
    allowed: set[Path] = set()
    if job_id is not None:
        ((state,),) = _rows(data, f"select state from jobs where id = '{job_id}'")
        if state == "running":
            allowed.add(data / "scratch" / job_id)
    left = _wait("no plaintext left", lambda: not _plaintext(data, allowed) or None, srv.started)
    assert left
    return state


@pytest.mark.slow
def test_kill9_during_uploads_anonymisation_and_a_job(tmp_path: Path) -> None:
    servers: list[Srv] = []
    try:
        _scenario(tmp_path, servers)
    finally:  # a failed check must not leave a server (and its Ray) running
        for s in servers:
            if s.proc.poll() is None:
                s.kill()


def _scenario(tmp_path: Path, servers: list[Srv]) -> None:
    rng = random.Random(2024)
    data = tmp_path / "data"
    env = server_env(data, num_cpus="2")
    tenant = cli(env, "tenant", "create", "Acme Gates", "--with-contract")
    token = cli(env, "token", "create", "--tenant", tenant["tenant_id"], "--scopes", "upload,read")["token"]
    auth = {"Authorization": f"Bearer {token}"}
    log = tmp_path / "server.log"
    locs: dict[str, str] = {}
    kills = 0

    # 1. Uploads and anonymisation, killed at a random moment.
    srv = Srv(env, log)
    servers.append(srv)
    with httpx.Client(base_url=srv.base, headers=auth, timeout=30) as http:
        pid = http.post("/v1/projects", json={"contract_id": tenant["contract_id"], "reference": "K-1"}).json()["id"]
        desc = json.loads((SAMPLE / "design" / "gate.json").read_text())
        desc.pop("file")
        desc["name"] = DESIGN_NAME
        design_id = http.post(f"/v1/projects/{pid}/designs", json={"descriptor": desc}).json()["id"]
        glb = (SAMPLE / "design" / "gate.glb").read_bytes()
        r = http.put(f"/v1/designs/{design_id}/file", content=glb, headers={"Content-Type": "model/gltf-binary"})
        assert r.status_code == 200, r.text
    uploader = threading.Thread(target=lambda: _swallow(_upload_all, srv.base, token, pid, locs), daemon=True)
    uploader.start()
    time.sleep(rng.uniform(1.5, 4.0))
    srv.kill()
    kills += 1
    uploader.join(30)

    # 2. Restart: the uploads resume where they were; every photo is anonymised within 60 s.
    srv = Srv(env, log)
    servers.append(srv)
    _upload_all(srv.base, token, pid, locs)
    _check_after_restart(data, srv, None)
    # Held by the new server now: it finishes them.
    _wait(
        "every photo anonymised",
        lambda: not _rows(data, "select id from photos where state in ('quarantined', 'anonymising')"),
        time.monotonic(),
        120,
    )
    photos = _rows(data, "select id, state from photos")
    ids = {loc.rsplit("/", 1)[1] for loc in locs.values()}
    assert {i for i, s in photos if s != "uploading"} == ids, "a photo row per upload, no more"
    assert all(s == "anonymised" for i, s in photos if i in ids), _rows(data, "select state, error from photos")
    names = {n: loc.rsplit("/", 1)[1] for n, loc in locs.items()}

    # 3. A job, killed twice at random moments while it runs.
    ref = json.loads((SAMPLE / "reference.json").read_text())
    for seg in ref["segments"]:
        seg["image"] = names[seg["image"]]
    place = json.loads((SAMPLE / "placement.json").read_text())
    place["image"] = names[place["image"]]
    with httpx.Client(base_url=srv.base, headers=auth, timeout=30) as http:
        r = http.post(f"/v1/projects/{pid}/jobs", json={"design_id": design_id, "reference": ref, "placement": place})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    for _ in range(2):
        _wait(
            "the job runs",
            lambda: _rows(data, f"select state from jobs where id = '{job_id}'")[0][0] != "queued",
            time.monotonic(),
            120,
        )
        time.sleep(rng.uniform(1.0, 8.0))
        srv.kill()
        kills += 1
        srv = Srv(env, log)
        servers.append(srv)
        state = _check_after_restart(data, srv, job_id)
        assert state in ("running", "done", "failed"), state

    # 4. After the last restart the job goes on to done (from its checkpoint, or from the start):
    #    one result, published once, its scratch gone and nothing decrypted left anywhere.
    with httpx.Client(base_url=srv.base, headers=auth, timeout=30) as http:
        t0 = time.monotonic()
        ended = lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] not in ("queued", "running")  # noqa: E731
        _wait("the job ends", ended, t0, 420)
        job = http.get(f"/v1/jobs/{job_id}").json()
        _wait("its scratch is gone", lambda: not (data / "scratch" / job_id).exists(), t0)
    assert job["state"] == "done", (job, log.read_text(errors="replace")[-3000:])
    assert not _plaintext(data, set()), _plaintext(data, set())
    ((attempts,),) = _rows(data, f"select attempts from jobs where id = '{job_id}'")
    assert attempts == 3, attempts  # one claim per run: the first and two resumptions
    plan_names = [n for (n,) in _rows(data, f"select name from plan_files where job_id = '{job_id}'")]
    assert len(plan_names) == len(set(plan_names)), "a plan file published twice"
    assert {"plan.glb", "report.json", "report.html"} <= set(plan_names), plan_names
    assert _rows(data, f"select count(*) from billing_records where job_id = '{job_id}'") == [(1,)]
    produced = f"select count(*) from register_entries where ref = '{job_id}' and action = 'plan_produced'"
    assert _rows(data, produced) == [(1,)]
    srv.kill()
    assert kills == 3
    # 5. The project made through the API, reprocessed at a new pipeline version by the batch
    #    driver (the same job driver, another caller): done, from the inputs the API stored.
    cmd = [str(SITEPLAN), "reprocess", "--pipeline-version", "2099.1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert _rows(data, "select state, kind from jobs where pipeline_version = '2099.1'") == [("done", "reprocess")]
    assert not _plaintext(data, set()), _plaintext(data, set())
    assert "Traceback" not in log.read_text(errors="replace")


def _swallow(fn, *args):  # type: ignore[no-untyped-def]
    with contextlib.suppress(httpx.TransportError, AssertionError):  # the server was killed under it
        fn(*args)
