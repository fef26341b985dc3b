"""Termination and erasure are serialised with everything that writes a contract's data (#24 D3,
D4, D8): two terminations at once, a termination or an erasure racing a slow tus PATCH, and the
certificate of a termination resumed after its first attempt stopped a running job."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import api.uploads as uploads
import dataprotection.lifecycle as lifecycle
from api.app import create_app
from dataprotection.lifecycle import TerminationError, hold_scratch, terminate_contract
from siteplan import PIPELINE_VERSION
from siteplan.db import Certificate, Contract, Job, Photo
from siteplan.paths import lifecycle_paths
from tests.api.conftest import Api, LiveServer, Tenant, make_settings

JPEG = next((Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg")).read_bytes()
TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture
def live_sqlite(tmp_path: Path) -> Iterator[tuple[LiveServer, Api]]:
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'siteplan.db'}"), background=False)
    server = LiveServer(app)
    try:
        with TestClient(app) as client:
            yield server, Api(client, app.state.services, app)
    finally:
        server.stop()


def _project(api: Api, t: Tenant, subject: str | None = None) -> str:
    body = {"contract_id": t.contract_id, "reference": "R-9", **({"subject_id": subject} if subject else {})}
    r = api.client.post("/v1/projects", json=body, headers=t.auth)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_two_terminations_at_once_run_the_steps_once(
    live_sqlite: tuple[LiveServer, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, api = live_sqlite
    t = api.tenant()
    _project(api, t)
    real = lifecycle._export_zip

    def slow_export(*a, **kw):  # type: ignore[no-untyped-def]
        time.sleep(1.0)  # long enough for the second request to arrive mid-termination
        return real(*a, **kw)

    monkeypatch.setattr(lifecycle, "_export_zip", slow_export)
    answers: list[httpx.Response] = []

    def end() -> None:
        with httpx.Client(base_url=server.url, headers=t.auth, timeout=60) as http:
            answers.append(http.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "return"}))

    threads = [threading.Thread(target=end) for _ in range(2)]
    for th in threads:
        th.start()
        time.sleep(0.2)
    for th in threads:
        th.join(60)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 409], [(r.status_code, r.text) for r in answers]
    busy = next(r for r in answers if r.status_code == 409).json()["error"]
    assert busy["code"] == "termination_running"
    # Once it has ended, asking again answers with what was done, and runs nothing again.
    again = api.client.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "return"}, headers=t.auth)
    assert again.status_code == 200
    paths = lifecycle_paths(api.svc.settings)
    archives = [p.name for p in paths.exports.iterdir() if not p.name.startswith(".")]
    assert archives == [f"{t.contract_id}-export.zip"], archives
    with api.svc.factory() as db:
        certs = db.scalars(select(Certificate).where(Certificate.contract_id == t.contract_id)).all()
        assert len(certs) == 1
        assert certs[0].document["document"]["export"]["file"] == archives[0]
        steps = db.get(Contract, t.contract_id).termination["steps"]  # type: ignore[union-attr]
    assert len(steps) == len(set(steps)), steps


def _slow_patch(server: LiveServer, t: Tenant, loc: str, data: bytes, go: threading.Event, out: list) -> None:  # type: ignore[type-arg]
    """A PATCH that sends a quarter of the photo, signals, then trickles the rest."""

    def body() -> Iterator[bytes]:
        step = 64 * 1024
        for i in range(0, len(data), step):
            if i >= len(data) // 4:
                go.set()
                time.sleep(0.15)
            yield data[i : i + step]

    headers = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            out.append(http.patch(loc, content=body(), headers=headers))
    except httpx.TransportError as exc:  # the server may close a refused stream early
        out.append(exc)
    go.set()


def _assert_nothing_left(api: Api, t: Tenant) -> None:
    root = api.svc.settings.uploads_dir / t.contract_id
    left = [str(p.relative_to(root)) for p in root.rglob("*")] if root.exists() else []
    assert not [n for n in left if not n.endswith(".lock")], left
    # The sweep takes what remains (lock files), without the (destroyed) key.
    uploads.ORPHAN_AGE_S = -1.0
    try:
        uploads.expire_uploads(api.svc)
    finally:
        uploads.ORPHAN_AGE_S = 3600.0
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))


@pytest.mark.parametrize("ending", ["terminate", "erase"])
def test_termination_or_erasure_racing_a_slow_patch(live_sqlite: tuple[LiveServer, Api], ending: str) -> None:
    server, api = live_sqlite
    t = api.tenant()
    r = api.client.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan"}, headers=t.auth)
    subject = r.json()["id"]
    pid = _project(api, t, subject)
    data = JPEG * 8  # ~2 MB: several batches
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": str(len(data))})
    assert r.status_code == 201, r.text
    loc = r.headers["Location"]
    go, out = threading.Event(), []  # type: ignore[var-annotated]
    th = threading.Thread(target=_slow_patch, args=(server, t, loc, data, go, out))
    th.start()
    assert go.wait(30)
    with httpx.Client(base_url=server.url, headers=t.auth, timeout=60) as http:
        if ending == "terminate":
            end = http.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "destroy"})
            assert end.status_code == 200, end.text
        else:
            end = http.delete(f"/v1/subjects/{subject}")
            assert end.status_code == 204, end.text
    th.join(60)
    (res,) = out
    if isinstance(res, httpx.Response):
        # One outcome: the upload is gone and the PATCH says so, or (on a loaded machine) it had
        # finished first and went with the rest. Never a 5xx.
        assert res.status_code in (204, 404, 410), (res.status_code, res.text, res.headers)
        if res.status_code == 204:
            assert int(res.headers["Upload-Offset"]) == len(data), "a 204 for an upload that no longer exists"
    with api.svc.factory() as db:
        assert db.scalars(select(Photo).where(Photo.project_id == pid)).first() is None
    # The upload's URL answers 404/410 from now on, and nothing was made again on disk.
    head = api.client.head(loc, headers=t.auth | TUS)
    assert head.status_code in (404, 410)
    _assert_nothing_left(api, t)


def test_an_upload_only_token_cannot_erase_or_rectify(live_sqlite: tuple[LiveServer, Api]) -> None:
    _, api = live_sqlite
    admin = api.tenant()
    r = api.client.post("/v1/subjects", json={"contract_id": admin.contract_id, "name": "Jan"}, headers=admin.auth)
    subject = r.json()["id"]
    from dataprotection.tenancy import create_token

    with api.svc.factory.begin() as db:
        tok = create_token(db, tenant_id=admin.id, name="uploader", scopes=["upload"]).secret
    h = {"Authorization": f"Bearer {tok}"}
    assert api.client.delete(f"/v1/subjects/{subject}", headers=h).status_code == 403
    assert api.client.patch(f"/v1/subjects/{subject}", json={"name": "X"}, headers=h).status_code == 403
    assert api.client.get(f"/v1/subjects/{subject}", headers=admin.auth).json()["name"] == "Jan"


def test_certificate_counts_jobs_cancelled_by_an_earlier_attempt(live_sqlite: tuple[LiveServer, Api]) -> None:
    """The first attempt cancels a running job and stops, waiting for it; the resumed one finds
    it cancelled already. The certificate still says one job was cancelled (it said 0)."""
    _, api = live_sqlite
    t = api.tenant()
    pid = _project(api, t)
    with api.svc.factory.begin() as db:
        j = Job(
            tenant_id=t.id,
            project_id=pid,
            kind="plan",
            state="running",
            pipeline_version=PIPELINE_VERSION,
            inputs={},
            timings={},
        )
        db.add(j)
        db.flush()
        job_id = j.id
    svc, paths = api.svc, lifecycle_paths(api.svc.settings)
    fd = hold_scratch(svc.settings.scratch_dir / job_id)  # the job's process, still stopping
    with pytest.raises(TerminationError, match="still stopping"):
        terminate_contract(
            svc.factory, svc.vault, paths, contract_id=t.contract_id, disposition="destroy", wait_for_jobs_s=0.3
        )
    os.close(fd)
    signed = terminate_contract(svc.factory, svc.vault, paths, contract_id=t.contract_id, disposition="destroy")
    assert signed["document"]["jobs_cancelled"] == 1


class _Killed(BaseException):
    """Stands for kill -9 at a step boundary (BaseException: nothing in the code catches it)."""


@pytest.mark.parametrize("step", ["freeze", "export", "inventory", "rows", "objects", "key"])
def test_termination_killed_at_a_step_then_run_again(live_sqlite: tuple[LiveServer, Api], step: str) -> None:
    """A 'return' termination stopped after each step and run again: one archive, one
    certificate, and its counts are what happened (one running job cancelled, every object)."""
    _, api = live_sqlite
    t = api.tenant()
    pid = _project(api, t)
    svc, paths = api.svc, lifecycle_paths(api.svc.settings)
    with svc.factory.begin() as db:
        db.add(
            Job(
                tenant_id=t.id,
                project_id=pid,
                kind="plan",
                state="running",
                pipeline_version=PIPELINE_VERSION,
                inputs={},
                timings={},
            )
        )
        obj = svc.vault.put(t.contract_id, JPEG)
        db.add(
            Photo(
                tenant_id=t.id,
                project_id=pid,
                contract_id=t.contract_id,
                length=len(JPEG),
                state="anonymised",
                object=obj.object_id,
                sha256=obj.sha256,
                intrinsics={},
            )
        )
    n_objects = len(svc.vault.objects(t.contract_id))

    def kill(at: str) -> None:
        if at == step:
            raise _Killed()

    with pytest.raises(_Killed):
        terminate_contract(
            svc.factory, svc.vault, paths, contract_id=t.contract_id, disposition="return", checkpoint=kill
        )
    signed = terminate_contract(svc.factory, svc.vault, paths, contract_id=t.contract_id, disposition="return")
    doc = signed["document"]
    archives = sorted(p.name for p in paths.exports.iterdir() if not p.name.startswith("."))
    assert archives == [f"{t.contract_id}-export.zip"], archives
    assert doc["export"]["file"] == archives[0]
    import hashlib

    assert doc["export"]["sha256"] == hashlib.sha256((paths.exports / archives[0]).read_bytes()).hexdigest()
    assert doc["jobs_cancelled"] == 1
    assert doc["destroyed"]["objects"] == n_objects
    with svc.factory() as db:
        assert len(db.scalars(select(Certificate).where(Certificate.contract_id == t.contract_id)).all()) == 1


def test_termination_racing_a_slow_design_upload_leaves_no_file(live_sqlite: tuple[LiveServer, Api]) -> None:
    server, api = live_sqlite
    t = api.tenant()
    pid = _project(api, t)
    d = api.client.post(f"/v1/projects/{pid}/designs", json={"descriptor": {"name": "gate"}}, headers=t.auth)
    design = d.json()["id"]
    go, out = threading.Event(), []  # type: ignore[var-annotated]
    glb = (Path(__file__).parents[2] / "sample_data" / "design" / "gate.glb").read_bytes()

    def body() -> Iterator[bytes]:
        for i in range(0, 40):
            if i == 2:
                go.set()
            time.sleep(0.05)
            yield glb[:65536] if i else glb[:4]

    def put() -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                out.append(
                    http.put(
                        f"/v1/designs/{design}/file",
                        content=body(),
                        headers=t.auth | {"Content-Type": "model/gltf-binary"},
                    )
                )
        except httpx.TransportError as exc:
            out.append(exc)

    th = threading.Thread(target=put)
    th.start()
    assert go.wait(30)
    end = api.client.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "destroy"}, headers=t.auth)
    assert end.status_code == 200, end.text
    th.join(60)
    (res,) = out
    if isinstance(res, httpx.Response):
        assert res.status_code in (404, 410), (res.status_code, res.text)
    container = api.svc.vault.object_path(t.contract_id, "0" * 32).parent
    assert not container.exists() or not any(container.iterdir()), list(container.iterdir())


def test_erasure_during_anonymisation_leaves_no_photo(
    live_sqlite: tuple[LiveServer, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.ingest as ingest_mod
    from api.runner import ingest_photo

    _, api = live_sqlite
    t = api.tenant()
    r = api.client.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan"}, headers=t.auth)
    subject = r.json()["id"]
    pid = _project(api, t, subject)
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": str(len(JPEG))})
    loc = r.headers["Location"]
    h = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    assert api.client.patch(loc, content=JPEG, headers=h).status_code == 204
    photo = loc.rsplit("/", 1)[1]
    decoding, erased = threading.Event(), threading.Event()
    real = ingest_mod.anonymize

    def slow_anonymize(*a, **kw):  # type: ignore[no-untyped-def]
        out = real(*a, **kw)
        decoding.set()
        assert erased.wait(30)
        return out

    monkeypatch.setattr(ingest_mod, "anonymize", slow_anonymize)
    th = threading.Thread(target=ingest_photo, args=(api.svc, photo))
    th.start()
    assert decoding.wait(60)
    assert api.client.delete(f"/v1/subjects/{subject}", headers=t.auth).status_code == 204
    erased.set()
    th.join(60)
    assert api.svc.vault.objects(t.contract_id) == [], "the anonymised photo was written after the erasure"
    with api.svc.factory() as db:
        assert db.get(Photo, photo) is None


def test_a_row_created_across_a_termination_is_not_left_behind(
    live_sqlite: tuple[LiveServer, Api], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A POST /v1/projects that passed its 'contract active' check when the termination started:
    the termination waits for it and takes the new project with the rest (before, the project
    was inserted after the rows were deleted and stayed, under an ended contract)."""
    import api.routes.projects as projects_route
    from siteplan.db import Project

    server, api = live_sqlite
    t = api.tenant()
    checked = threading.Event()
    real = projects_route.new_project

    def slow_new_project(*a, **kw):  # type: ignore[no-untyped-def]
        checked.set()
        time.sleep(1.0)  # the termination starts here
        return real(*a, **kw)

    monkeypatch.setattr(projects_route, "new_project", slow_new_project)
    out: list[httpx.Response] = []

    def create() -> None:
        with httpx.Client(base_url=server.url, headers=t.auth, timeout=60) as http:
            out.append(http.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "late"}))

    th = threading.Thread(target=create)
    th.start()
    assert checked.wait(30)
    with httpx.Client(base_url=server.url, headers=t.auth, timeout=60) as http:
        end = http.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "destroy"})
    th.join(60)
    assert end.status_code == 200, end.text
    assert out and out[0].status_code in (201, 409), out
    with api.svc.factory() as db:
        left = db.scalars(select(Project).where(Project.contract_id == t.contract_id)).all()
    assert not left, "a project was left under the ended contract"
