"""The edges of the upload protocol and of the error contract, found by a review of the live server:
a refused upload must not look finished, one byte too many must not cost the bytes before it, a
delete must not pull an upload from under a PATCH, and a server fault must not write a traceback."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from api.app import create_app
from api.uploads import locked
from siteplan.db import IdempotencyRecord, Photo
from tests.api.conftest import Api, LiveServer, make_settings, open_sqlite_api
from tests.api.test_uploads import IPHONE, TUS, create, project

PATCH = {"Content-Type": "application/offset+octet-stream"}


def patch(api: Api, loc: str, auth: dict[str, str], offset: int, content: object) -> object:
    return api.client.patch(loc, content=content, headers=auth | TUS | PATCH | {"Upload-Offset": str(offset)})


def test_one_chunk_too_many_keeps_what_arrived(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    data = IPHONE.read_bytes()
    loc = create(api, t, pid, len(data))
    half = 600_000
    assert patch(api, loc, t.auth, 0, data[:half]).status_code == 204  # type: ignore[attr-defined]
    # Declared too long: refused before a byte is read.
    r = patch(api, loc, t.auth, half, data[half:] + b"0123456789")
    assert r.status_code == 413  # type: ignore[attr-defined]
    # Streamed (chunked, no length) past the end: refused, what came before the excess is kept.
    r = patch(api, loc, t.auth, half, iter([data[half : half + 300_000], data[half + 300_000 :] + b"x" * 10]))
    assert r.status_code == 413  # type: ignore[attr-defined]
    head = api.client.head(loc, headers=t.auth | TUS)
    assert head.status_code == 200
    at = int(head.headers["Upload-Offset"])
    assert half <= at < len(data)
    assert patch(api, loc, t.auth, at, data[at:]).status_code == 204  # type: ignore[attr-defined]
    photo = api.client.get(f"/v1/photos/{loc.rsplit('/', 1)[1]}", headers=t.auth).json()
    assert photo["state"] == "quarantined"


def test_a_refused_upload_is_gone_not_finished(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    loc = create(api, t, pid, 5000)
    assert patch(api, loc, t.auth, 0, b"%PDF-1.7\n" + b"0" * 4991).status_code == 415  # type: ignore[attr-defined]
    head = api.client.head(loc, headers=t.auth | TUS)
    assert head.status_code == 410 and "Upload-Offset" not in head.headers
    r = patch(api, loc, t.auth, 5000, b"")
    assert r.status_code == 410 and r.json()["error"]["code"] == "upload_refused"  # type: ignore[attr-defined]
    # Under 32 bytes the type is still checked by content.
    tiny = create(api, t, pid, 20)
    assert patch(api, tiny, t.auth, 0, b"A" * 20).status_code == 415  # type: ignore[attr-defined]


def test_tus_answers_carry_the_version_even_when_they_fail(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    loc = create(api, t, pid, 100)
    assert api.client.head("/v1/uploads/nope", headers=t.auth | TUS).headers.get("Tus-Resumable") == "1.0.0"
    r = api.client.patch(loc, content=b"x", headers=t.auth | TUS | {"Upload-Offset": "0"})  # no Content-Type
    assert r.status_code == 415 and r.headers.get("Tus-Resumable") == "1.0.0"
    r = patch(api, loc, t.auth, 7, b"x")
    assert r.status_code == 409 and r.headers["Upload-Offset"] == "0"  # type: ignore[attr-defined]
    assert r.headers.get("Tus-Resumable") == "1.0.0"  # type: ignore[attr-defined]


def test_delete_waits_for_no_patch_and_a_finished_upload_leaves_nothing_behind(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    data = IPHONE.read_bytes()
    loc = create(api, t, pid, len(data))
    photo_id = loc.rsplit("/", 1)[1]
    with api.scoped(t.id) as db:
        p = db.get(Photo, photo_id)
        assert p is not None
        with locked(api.svc, p, exclusive=True):  # a PATCH writing it
            r = api.client.delete(loc, headers=t.auth | TUS)
            assert r.status_code == 409 and r.json()["error"]["code"] == "upload_busy"
            assert api.client.delete(f"/v1/photos/{photo_id}", headers=t.auth).status_code == 409
    assert patch(api, loc, t.auth, 0, data).status_code == 204  # type: ignore[attr-defined]
    assert api.client.head(loc, headers=t.auth | TUS).headers["Upload-Offset"] == str(len(data))
    # No staging directory and no lock file left for it (the HEAD above did not make one).
    left = [q.name for q in (api.svc.settings.uploads_dir / t.contract_id).iterdir()]
    assert not [n for n in left if photo_id in n], left
    # An unfinished one is deleted with what arrived of it.
    loc2 = create(api, t, pid, len(data))
    assert patch(api, loc2, t.auth, 0, data[:1000]).status_code == 204  # type: ignore[attr-defined]
    assert api.client.delete(loc2, headers=t.auth | TUS).status_code == 204
    assert api.client.head(loc2, headers=t.auth | TUS).status_code == 404


def test_error_contract_on_odd_requests(api: Api) -> None:
    t = api.tenant()
    # A JSON body over the cap, streamed without a length: 413 (FastAPI's parser said 400).
    r = api.client.post(
        "/v1/projects",
        content=iter([b"{" + b" " * 2**20, b" " * 2**20 + b"}"]),
        headers=t.auth | {"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # Headers far over any phone's: 431, in the JSON shape.
    r = api.client.get("/v1/projects", headers=t.auth | {"X-Big": "a" * 40_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    # Broken JSON: no character position passed off as a field.
    r = api.client.post(
        "/v1/projects", content=b'{"contract_id": ', headers=t.auth | {"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["field"] is None


def test_job_polling_etag_compares_weakly(api: Api) -> None:
    from siteplan.db import Job

    t = api.tenant()
    pid = project(api, t)
    with api.scoped(t.id) as db:
        job = Job(tenant_id=t.id, project_id=pid, pipeline_version="test")
        db.add(job)
        db.commit()
        jid = job.id
    r = api.client.get(f"/v1/jobs/{jid}", headers=t.auth)
    etag = r.headers["ETag"]
    # RFC 9110: If-None-Match is a weak comparison, and "*" matches any current job.
    for sent in (etag, f"W/{etag}", f'"other", W/{etag}', "*"):
        again = api.client.get(f"/v1/jobs/{jid}", headers=t.auth | {"If-None-Match": sent})
        assert again.status_code == 304, sent
    assert api.client.get(f"/v1/jobs/{jid}", headers=t.auth | {"If-None-Match": '"other"'}).status_code == 200


def test_an_unexpected_error_is_one_log_line_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Served by uvicorn, as in production: its own error log is what an operator reads (it
    logged the whole traceback, file paths included, after Starlette re-raised)."""
    import httpx

    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 's.db'}"), background=False)

    def boom() -> None:
        raise FileNotFoundError(str(tmp_path / "private" / "Janssens.jpg"))

    app.add_api_route("/v1/boom", boom)
    with caplog.at_level(logging.DEBUG):
        server = LiveServer(app)
        try:
            r = httpx.get(f"{server.url}/v1/boom", timeout=10)
        finally:
            server.stop()
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "unhandled FileNotFoundError on GET /v1/boom" in caplog.text
    assert "Janssens" not in caplog.text and str(tmp_path) not in caplog.text
    assert "Traceback" not in caplog.text and not [rec for rec in caplog.records if rec.exc_info]


def test_an_oversized_design_leaves_no_temporary_file(tmp_path: Path) -> None:
    with open_sqlite_api(tmp_path, max_upload_bytes=2**20) as api:
        _oversized_design(api)


def _oversized_design(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    r = api.client.post(f"/v1/projects/{pid}/designs", json={}, headers=t.auth)
    assert r.status_code == 201, r.text
    did = r.json()["id"]
    r = api.client.put(
        f"/v1/designs/{did}/file",
        content=iter([b"solid x\n" * 100_000] * 4),  # 3.2 MB, streamed without a length
        headers=t.auth | {"Content-Type": "model/stl"},
    )
    assert r.status_code == 413
    vault = api.svc.settings.vault_dir
    assert not [p for p in vault.rglob("*") if p.is_file() and ".tmp" in p.name]


def test_idempotency_records_hold_no_guessable_hash_and_go_with_the_subject(api: Api) -> None:
    t = api.tenant()
    body = {"contract_id": t.contract_id, "name": "Jane Doe", "address": "1 Main St", "phone": "+44 1234"}
    r = api.client.post("/v1/subjects", json=body, headers=t.auth | {"Idempotency-Key": "subj-1"})
    assert r.status_code == 201
    sid = r.json()["id"]
    plain = hashlib.sha256(json.dumps(["POST", "/subjects", body], sort_keys=True).encode()).hexdigest()
    with api.scoped(t.id) as db:
        (rec,) = db.query(IdempotencyRecord).all()
        assert rec.fingerprint != plain and "Jane" not in json.dumps(rec.body)
    again = api.client.post("/v1/subjects", json=body, headers=t.auth | {"Idempotency-Key": "subj-1"})
    assert again.status_code == 201 and again.json()["id"] == sid  # still a replay
    assert api.client.delete(f"/v1/subjects/{sid}", headers=t.auth).status_code == 204
    with api.scoped(t.id) as db:
        assert db.query(IdempotencyRecord).count() == 0


def test_unfinished_uploads_expire_with_what_arrived(api: Api) -> None:
    import os
    import time
    from datetime import UTC, datetime, timedelta

    from api.uploads import expire_uploads

    t = api.tenant()
    pid = project(api, t)
    data = IPHONE.read_bytes()
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": str(len(data))})
    assert "Upload-Expires" in r.headers
    old, fresh = r.headers["Location"], create(api, t, pid, len(data))
    for loc in (old, fresh):
        assert patch(api, loc, t.auth, 0, data[:5000]).status_code == 204  # type: ignore[attr-defined]
    old_id = old.rsplit("/", 1)[1]
    staged = api.svc.settings.uploads_dir / t.contract_id / old_id
    long_ago = time.time() - api.svc.settings.upload_expiry_s - 60
    for f in staged.iterdir():
        os.utime(f, (long_ago, long_ago))
    with api.scoped(t.id) as db:
        p = db.get(Photo, old_id)
        assert p is not None
        p.created_at = datetime.now(UTC) - timedelta(seconds=api.svc.settings.upload_expiry_s + 60)
        db.commit()
    assert expire_uploads(api.svc) == 1
    assert api.client.head(old, headers=t.auth | TUS).status_code == 404
    assert not staged.exists()
    assert api.client.head(fresh, headers=t.auth | TUS).headers["Upload-Offset"] == "5000"
    # Staging whose row is gone (a PATCH that wrote after an erasure deleted it) has no upload
    # for the expiry to find: it is shredded once idle for an hour, a live upload's is not.
    orphan = create(api, t, pid, len(data))
    assert patch(api, orphan, t.auth, 0, data[:5000]).status_code == 204  # type: ignore[attr-defined]
    orphan_id = orphan.rsplit("/", 1)[1]
    with api.scoped(t.id) as db:
        db.delete(db.get(Photo, orphan_id))
        db.commit()
    left = [api.svc.settings.uploads_dir / t.contract_id / n for n in (orphan_id, f".{orphan_id}.lock")]
    hour_ago = time.time() - 3700
    for f in left:
        os.utime(f, (hour_ago, hour_ago))
    expire_uploads(api.svc)
    assert not any(f.exists() for f in left)
    assert api.client.head(fresh, headers=t.auth | TUS).headers["Upload-Offset"] == "5000"
    opts = api.client.options("/v1/uploads", headers=t.auth | TUS)
    assert "expiration" in opts.headers["Tus-Extension"]
