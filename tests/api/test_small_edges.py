"""#24's small ones: tus numbers are digits only, the accepted types are exactly the documented
ones, a replay of a deleted upload is 410, the error log names the route template, and photos
uploaded while their client was restricted resume once it is lifted, without a restart."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pytest
from PIL import Image

from api.runner import Runner
from siteplan.db import Photo
from tests.api.conftest import Api, open_sqlite_api
from tests.api.test_uploads import TUS, create, project

JPEG = next((Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg")).read_bytes()


def test_tus_numbers_are_digits_only(sqlite_api: Api) -> None:
    api = sqlite_api
    t = api.tenant()
    pid = project(api, t)
    for bad in ("+10", "1_000", " 10", "1e3", "-5", "0x10", "0"):
        r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": bad})
        assert r.status_code == 422, (bad, r.status_code)
        assert r.json()["error"]["field"] == "Upload-Length"
    loc = create(api, t, pid, len(JPEG))
    for bad in ("+0", "0_0", "-0"):
        h = t.auth | TUS | {"Upload-Offset": bad, "Content-Type": "application/offset+octet-stream"}
        assert api.client.patch(loc, content=JPEG[:10], headers=h).status_code == 422, bad


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_undocumented_types_are_refused(sqlite_api: Api, fmt: str) -> None:
    api = sqlite_api
    t = api.tenant()
    pid = project(api, t)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buf, fmt)
    data = buf.getvalue()
    loc = create(api, t, pid, len(data))
    h = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    r = api.client.patch(loc, content=data, headers=h)
    assert r.status_code == 415, r.text
    assert "JPEG, PNG, WebP, TIFF, HEIC/HEIF" in r.json()["error"]["message"]


def test_replaying_a_deleted_upload_is_gone(sqlite_api: Api) -> None:
    api = sqlite_api
    t = api.tenant()
    pid = project(api, t)
    loc = create(api, t, pid, len(JPEG), key="k-1")
    assert api.client.delete(loc, headers=t.auth | TUS).status_code == 204
    h = t.auth | TUS | {"Upload-Length": str(len(JPEG)), "Idempotency-Key": "k-1"}
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=h)
    assert r.status_code == 410, (r.status_code, r.headers.get("Location"))


def test_the_error_log_names_the_route_template(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    api = sqlite_api
    t = api.tenant()
    pid = project(api, t)

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("api.routes.jobs.get_project", boom)
    with caplog.at_level(logging.ERROR, logger="api.app"):
        r = api.client.get(f"/v1/projects/{pid}/jobs", headers=t.auth)
    assert r.status_code == 500
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "api.app"]
    assert lines == ["unhandled RuntimeError on GET /v1/projects/{project_id}/jobs"], lines
    assert pid not in " ".join(lines)


def test_photos_of_a_restricted_client_resume_once_lifted(tmp_path: Path) -> None:
    with open_sqlite_api(tmp_path, ingest_workers=1, run_jobs=False) as api:
        t = api.tenant()
        r = api.client.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan"}, headers=t.auth)
        sid = r.json()["id"]
        body = {"contract_id": t.contract_id, "reference": "R", "subject_id": sid}
        pid = api.client.post("/v1/projects", json=body, headers=t.auth).json()["id"]
        assert api.client.post(f"/v1/subjects/{sid}/restrict", headers=t.auth).status_code == 200
        loc = create(api, t, pid, len(JPEG))
        h = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        assert api.client.patch(loc, content=JPEG, headers=h).status_code == 204
        photo = loc.rsplit("/", 1)[1]
        runner = Runner(api.svc)
        try:
            runner.recover()
            time.sleep(1.0)
            with api.svc.factory() as db:
                assert db.get(Photo, photo).state == "quarantined"  # restricted: not processed
            assert api.client.post(f"/v1/subjects/{sid}/lift-restriction", headers=t.auth).status_code == 200
            runner.recover()  # the running server's next pass (every few seconds), no restart
            deadline = time.monotonic() + 60
            while True:
                with api.svc.factory() as db:
                    state = db.get(Photo, photo).state
                if state == "anonymised":
                    break
                assert time.monotonic() < deadline, state
                time.sleep(0.2)
        finally:
            runner.shutdown()
