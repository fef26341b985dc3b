"""Resumable uploads: dropped connections, tus interop, idempotency, and limits while streaming."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from api.runner import ingest_photo
from dataprotection.vault import CHUNK
from tests.api.conftest import Api, LiveServer, Tenant

DATA = Path(__file__).parents[3] / "shared" / "data"
IPHONE = DATA / "exif" / "exif-samples" / "jpg" / "hdr" / "iphone_hdr_YES.jpg"  # 2 MB, Apple, GPS
TUS = {"Tus-Resumable": "1.0.0"}


def project(api: Api, t: Tenant) -> str:
    r = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "P"}, headers=t.auth)
    assert r.status_code == 201
    return str(r.json()["id"])


def create(api: Api, t: Tenant, pid: str, length: int, key: str | None = None) -> str:
    h = t.auth | TUS | {"Upload-Length": str(length)} | ({"Idempotency-Key": key} if key else {})
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=h)
    assert r.status_code == 201, r.text
    return str(r.headers["Location"])


def send_and_drop(server: LiveServer, loc: str, token: str, offset: int, data: bytes, cut: int) -> None:
    """Start a PATCH that announces all remaining bytes, send only ``cut`` of them, then drop the
    connection, as a phone losing signal does."""
    head = (
        f"PATCH {loc} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Content-Length: {len(data) - offset}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head)
        body = data[offset : offset + cut]
        for i in range(0, len(body), 65536):
            s.sendall(body[i : i + 65536])
        time.sleep(0.05)
        s.shutdown(socket.SHUT_RDWR)


def bomb_png(w: int, h: int) -> bytes:
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", w, h) + bytes(raw[24:29])
    raw[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return bytes(raw)


def offset_of(http: httpx.Client, loc: str, t: Tenant) -> int:
    r = http.head(loc, headers=t.auth | TUS)
    assert r.status_code == 200
    return int(r.headers["Upload-Offset"])


def test_interrupted_upload_resumes_to_the_same_anonymised_photo(live: tuple[LiveServer, Api]) -> None:
    server, api = live
    t = api.tenant()
    pid = project(api, t)
    data = IPHONE.read_bytes()
    rng = random.Random(7)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # Reference: the same photo in one go.
        ref_loc = create(api, t, pid, len(data))
        r = http.patch(
            ref_loc,
            content=data,
            headers=t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        assert r.status_code == 204 and int(r.headers["Upload-Offset"]) == len(data)

        loc = create(api, t, pid, len(data))
        drops = 0
        offset = 0
        while offset < len(data):
            left = len(data) - offset
            if drops < 6 and left > 1000:
                send_and_drop(server, loc, t.token, offset, data, rng.randrange(1, left))
                drops += 1
            else:
                r = http.patch(
                    loc,
                    content=data[offset:],
                    headers=t.auth
                    | TUS
                    | {"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
                )
                assert r.status_code in (204, 409), r.text
            new = offset_of(http, loc, t)
            assert new >= offset, "an acknowledged byte was lost"
            offset = new
        assert drops == 6
        # Resuming at a stale offset is refused and says where the upload really is.
        r = http.patch(
            loc,
            content=b"x",
            headers=t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
        )
        assert r.status_code == 409
    ids = [ref_loc.rsplit("/", 1)[1], loc.rsplit("/", 1)[1]]
    for i in ids:
        ingest_photo(api.svc, i)
    a, b = (api.client.get(f"/v1/photos/{i}", headers=t.auth).json() for i in ids)
    assert a["state"] == b["state"] == "anonymised"
    assert a["sha256"] == b["sha256"], "the resumed upload gave a different photo"
    jpeg = api.client.get(f"/v1/photos/{ids[1]}/content", headers=t.auth).content
    assert jpeg[:3] == b"\xff\xd8\xff"
    # The original's GPS and camera identity are gone (exiftool as the independent reader).
    out = subprocess.run(["exiftool", "-s", "-a", "-G1", "-"], input=jpeg, capture_output=True, check=True).stdout
    assert b"GPS" not in out and b"Apple" not in out
    # The original was destroyed after anonymisation (default policy), and no plaintext remains.
    root = api.svc.settings.root
    needle = data[4096:4160]
    for f in root.rglob("*"):
        if f.is_file():
            assert needle not in f.read_bytes(), f"plaintext of the upload found in {f.relative_to(root)}"


def test_tus_client_interop(live: tuple[LiveServer, Api], tmp_path: Path) -> None:
    """A stock tus client (tuspy) uploads in 256 KiB chunks."""
    from tusclient import client as tus

    server, api = live
    t = api.tenant()
    pid = project(api, t)
    c = tus.TusClient(f"{server.url}/v1/projects/{pid}/uploads", headers=t.auth)
    up = c.uploader(str(IPHONE), chunk_size=256 * 1024, metadata={"filename": "Janssens_front.jpg"})
    up.upload()
    photo_id = up.url.rsplit("/", 1)[1]
    r = api.client.get(f"/v1/photos/{photo_id}", headers=t.auth).json()
    assert r["state"] == "quarantined" and r["length"] == IPHONE.stat().st_size
    # The file name sent in Upload-Metadata is stored nowhere.
    for f in api.svc.settings.root.rglob("*"):
        if f.is_file():
            assert b"Janssens" not in f.read_bytes()


def test_idempotent_creation(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    a = create(api, t, pid, 1234, key="photo-1")
    b = create(api, t, pid, 1234, key="photo-1")
    assert a == b
    assert api.client.get(f"/v1/projects/{pid}/photos", headers=t.auth).json()["total"] == 1
    # The same key for a different request is a conflict, not a silent second photo.
    r = api.client.post(
        f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": "99", "Idempotency-Key": "photo-1"}
    )
    assert r.status_code == 409
    # Jobs and projects too.
    body = {"contract_id": t.contract_id, "reference": "same"}
    h = t.auth | {"Idempotency-Key": "p-1"}
    r1, r2 = (api.client.post("/v1/projects", json=body, headers=h) for _ in range(2))
    assert r1.json() == r2.json()


def test_limits_while_streaming(api: Api) -> None:
    t = api.tenant()
    pid = project(api, t)
    patch = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    # Too large, refused at creation.
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": str(2**40)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    # Not an image: refused from its first bytes, with nothing kept.
    loc = create(api, t, pid, 5000)
    r = api.client.patch(loc, content=b"%PDF-1.7\n" + b"0" * 4991, headers=patch)
    assert r.status_code == 415
    assert api.client.get(f"/v1/photos/{loc.rsplit('/', 1)[1]}", headers=t.auth).json()["state"] == "rejected"
    # A decompression bomb: a real PNG whose header claims 30000 x 30000, refused from the header
    # alone, before the rest has arrived.
    png = bomb_png(30000, 30000)
    loc = create(api, t, pid, len(png) + CHUNK)
    r = api.client.patch(loc, content=png + b"\0" * CHUNK, headers=patch)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
    # More bytes than declared.
    loc = create(api, t, pid, 10)
    r = api.client.patch(loc, content=b"\xff\xd8\xff" + b"0" * 20, headers=patch)
    assert r.status_code == 413
    # Wrong content type for a chunk; wrong tus version.
    loc = create(api, t, pid, 10)
    assert api.client.patch(loc, content=b"0", headers=patch | {"Content-Type": "image/jpeg"}).status_code == 415
    assert api.client.patch(loc, content=b"0", headers=patch | {"Tus-Resumable": "0.2"}).status_code == 412
    # A JSON body over the cap.
    r = api.client.post(
        "/v1/projects", content=b"{" + b" " * (2 * 2**20) + b"}", headers=t.auth | {"Content-Type": "application/json"}
    )
    assert r.status_code == 413


@pytest.mark.parametrize("bad", [b"", b"\xff\xd8\xff\xe0" + b"\0" * 100])
def test_broken_photo_is_rejected_with_a_reason(api: Api, bad: bytes) -> None:
    t = api.tenant()
    pid = project(api, t)
    if not bad:
        r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": "0"})
        assert r.status_code == 422
        return
    loc = create(api, t, pid, len(bad))
    r = api.client.patch(
        loc,
        content=bad,
        headers=t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert r.status_code == 204
    photo_id = loc.rsplit("/", 1)[1]
    ingest_photo(api.svc, photo_id)
    p = api.client.get(f"/v1/photos/{photo_id}", headers=t.auth).json()
    assert p["state"] == "rejected" and p["error"]
    assert api.svc.vault.objects(t.contract_id) == []  # nothing of it kept


def _segfault(data: bytes) -> tuple[None, None]:
    """A decoder that dies on the file (run in the sandbox child, never in the server)."""
    os.kill(os.getpid(), signal.SIGSEGV)
    return None, None


def test_a_photo_that_crashes_the_decoder_is_rejected_and_the_server_goes_on(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import privacy.anonymize as gate
    from privacy.sandbox import run_isolated

    api = sqlite_api
    t = api.tenant()
    pid = project(api, t)
    data = b"\xff\xd8\xff\xe0 hostile " + b"\0" * 1000
    loc = create(api, t, pid, len(data))
    headers = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    assert api.client.patch(loc, content=data, headers=headers).status_code == 204

    def crashing(data: bytes, *, max_pixels: int, timeout_s: float) -> object:
        return run_isolated(_segfault, data, timeout_s=timeout_s, memory_bytes=2**30)

    monkeypatch.setattr(gate, "read_untrusted", crashing)
    photo_id = loc.rsplit("/", 1)[1]
    ingest_photo(api.svc, photo_id)  # in this process, as the server's ingest thread runs it
    p = api.client.get(f"/v1/photos/{photo_id}", headers=t.auth).json()
    assert p["state"] == "rejected" and "crashed the image decoder" in p["error"]
    assert api.svc.vault.objects(t.contract_id) == []  # the hostile original is not kept
    assert api.client.get(f"/v1/projects/{pid}/photos", headers=t.auth).status_code == 200  # still serving
