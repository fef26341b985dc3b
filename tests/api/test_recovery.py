"""Claims die with their process (siteplan/leases.py) and a running server takes them back
(api.runner.Runner.recover): photos left 'anonymising', jobs left 'running', scratch a crashed job
left with decrypted photos in it. No restart needed, and a live holder's claim is never taken."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from api.runner import MAX_JOB_ATTEMPTS, Runner
from dataprotection.lifecycle import hold_scratch
from siteplan import PIPELINE_VERSION, leases
from siteplan.db import Job, Photo
from tests.api.conftest import Api, open_sqlite_api

JPEG = next((Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg")).read_bytes()


def _dead_holder() -> str:
    """The holder name of a process of this host that has exited."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{leases.holder().split(':')[0]}:{int(p.stdout)}:deadbeef"


def _project(api: Api) -> tuple[object, str]:
    t = api.tenant()
    r = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "R-1"}, headers=t.auth)
    assert r.status_code == 201, r.text
    return t, r.json()["id"]


def _photo(api: Api, t: object, project_id: str, **kw: object) -> str:
    obj = api.svc.vault.put(t.contract_id, JPEG)  # type: ignore[attr-defined]
    with api.svc.factory.begin() as db:
        p = Photo(
            tenant_id=t.id,  # type: ignore[attr-defined]
            project_id=project_id,
            contract_id=t.contract_id,  # type: ignore[attr-defined]
            length=len(JPEG),
            original_object=obj.object_id,
            **kw,
        )
        db.add(p)
        db.flush()
        return p.id


def _job(api: Api, t: object, project_id: str, **kw: object) -> str:
    with api.svc.factory.begin() as db:
        j = Job(
            tenant_id=t.id,  # type: ignore[attr-defined]
            project_id=project_id,
            kind="plan",
            pipeline_version=PIPELINE_VERSION,
            inputs={},
            timings={},
            **kw,
        )
        db.add(j)
        db.flush()
        return j.id


def _state(api: Api, model: type, row_id: str) -> str:
    with api.svc.factory() as db:
        return str(db.get(model, row_id).state)


def test_claims_of_dead_processes_are_taken_back_by_the_running_server(tmp_path: Path) -> None:
    with open_sqlite_api(tmp_path, ingest_workers=1, run_jobs=False) as api:
        t, pid = _project(api)
        soon = datetime.now(UTC) + timedelta(minutes=10)
        # Left by a process killed with -9 a moment ago: its lease has not run out yet, but its
        # pid is gone (the old rule waited 15 minutes, and only at start-up).
        dead = _photo(api, t, pid, state="anonymising", lease_holder=_dead_holder(), lease_until=soon)
        # Left by a process elsewhere whose lease ran out.
        expired = _photo(api, t, pid, state="anonymising", lease_holder="otherhost:1:ab", lease_until=datetime.now(UTC))
        # Held by a live process (another host, lease running): never taken.
        live = _photo(api, t, pid, state="anonymising", lease_holder="otherhost:2:cd", lease_until=soon)
        running_dead = _job(api, t, pid, state="running", attempts=1, lease_holder=_dead_holder(), lease_until=soon)
        worn_out = _job(api, t, pid, state="running", attempts=MAX_JOB_ATTEMPTS, lease_holder=None)
        live_job = _job(api, t, pid, state="running", attempts=1, lease_holder="otherhost:3:ef", lease_until=soon)
        # Its crashed run left decrypted photos and the design's name in scratch.
        scratch = api.svc.settings.scratch_dir
        for j in (running_dead, worn_out):
            (scratch / j / "photos").mkdir(parents=True)
            (scratch / j / "photos" / "p.jpg").write_bytes(JPEG)
            (scratch / j / "design").mkdir()
            (scratch / j / "design" / "design.json").write_text('{"name": "Poort van Janssens"}')
        # A directory a live job holds is never touched.
        held = hold_scratch(scratch / live_job)
        (scratch / live_job / "x.jpg").write_bytes(JPEG)
        # Scratch of a job no row names any more (a crash before the row said so), a while ago.
        (scratch / "orphan").mkdir()
        (scratch / "orphan" / "x.jpg").write_bytes(JPEG)
        old = time.time() - 3600
        os.utime(scratch / "orphan", (old, old))

        runner = Runner(api.svc)
        try:
            t0 = time.monotonic()
            photos, _ = runner.recover()
            assert photos >= 2
            deadline = time.monotonic() + 60
            while {_state(api, Photo, p) for p in (dead, expired)} - {"anonymised", "rejected"}:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            print(f"two abandoned photos anonymised {time.monotonic() - t0:.1f} s after the recovery pass")
        finally:
            runner.shutdown()
        assert _state(api, Photo, dead) == _state(api, Photo, expired) == "anonymised"
        assert _state(api, Photo, live) == "anonymising"
        assert _state(api, Job, running_dead) == "queued"  # resumes from its checkpoint
        with api.svc.factory() as db:
            w = db.get(Job, worn_out)
            assert w.state == "failed" and "interrupted" in (w.error or "")
            assert db.get(Job, running_dead).lease_holder is None
        assert _state(api, Job, live_job) == "running"
        assert not (scratch / running_dead).exists() and not (scratch / worn_out).exists()
        assert not (scratch / "orphan").exists()
        assert (scratch / live_job / "x.jpg").exists()
        os.close(held)


def test_a_lease_is_renewed_while_the_work_runs_and_cleared_after(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(leases, "BEAT_S", 0.1)
    with open_sqlite_api(tmp_path) as api:
        t, pid = _project(api)
        first = datetime.now(UTC) + timedelta(seconds=1)
        p = _photo(api, t, pid, state="anonymising", lease_holder=leases.holder(), lease_until=first)
        with api.svc.factory() as db:
            before = db.get(Photo, p).updated_at
        lease = leases.Lease(api.svc.factory, Photo, p).start()
        time.sleep(0.5)
        with api.svc.factory() as db:
            row = db.get(Photo, p)
            until = row.lease_until if row.lease_until.tzinfo else row.lease_until.replace(tzinfo=UTC)
            assert until > first, "the lease was not renewed"
            assert row.updated_at == before, "the renewal changed updated_at (ETags, stale rules)"
            assert not leases.gone(row.lease_holder, row.lease_until)
        lease.release()
        with api.svc.factory() as db:
            row = db.get(Photo, p)
            assert row.lease_holder is None and row.lease_until is None
        assert not lease.lost.is_set()
        # Another process took the row: the old holder learns it at its next beat.
        with api.svc.factory.begin() as db:
            db.get(Photo, p).lease_holder = leases.holder()
        lost = leases.Lease(api.svc.factory, Photo, p).start()
        with api.svc.factory.begin() as db:
            db.get(Photo, p).lease_holder = "otherhost:9:aa"
        assert lost.lost.wait(5)
        lost.release()
