"""Contract termination, the certificate and the register through the API."""

from __future__ import annotations

from pathlib import Path

from api.runner import ingest_photo
from dataprotection import signing
from dataprotection.lifecycle import verify_certificate
from tests.api.conftest import Api

PHOTO = Path(__file__).parents[2] / "sample_data" / "photos" / "street_people.jpg"
TUS = {"Tus-Resumable": "1.0.0"}


def test_terminate_destroys_and_certifies(api: Api) -> None:
    c = api.client
    t = api.tenant()
    s = c.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan Janssens"}, headers=t.auth).json()
    p = c.post(
        "/v1/projects", json={"contract_id": t.contract_id, "reference": "P", "subject_id": s["id"]}, headers=t.auth
    ).json()
    data = PHOTO.read_bytes()
    loc = c.post(f"/v1/projects/{p['id']}/uploads", headers=t.auth | TUS | {"Upload-Length": str(len(data))}).headers[
        "Location"
    ]
    r = c.patch(
        loc,
        content=data,
        headers=t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert r.status_code == 204
    photo_id = loc.rsplit("/", 1)[1]
    ingest_photo(api.svc, photo_id)
    assert c.get(f"/v1/photos/{photo_id}", headers=t.auth).json()["state"] == "anonymised"
    assert c.get(f"/v1/contracts/{t.contract_id}/certificate", headers=t.auth).status_code == 409
    # A transfer to a key that is not one: refused before anything is frozen (it was a 500,
    # with the contract stuck in "terminating").
    bad = {"disposition": "transfer", "recipient_public_key": "garbage"}
    r = c.post(f"/v1/contracts/{t.contract_id}/terminate", json=bad, headers=t.auth)
    assert r.status_code == 422 and r.json()["error"]["field"] == "recipient_public_key", r.text
    assert c.get(f"/v1/contracts/{t.contract_id}", headers=t.auth).json()["state"] == "active"

    r = c.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "destroy"}, headers=t.auth)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "ended"
    assert c.get(f"/v1/photos/{photo_id}", headers=t.auth).status_code == 404
    assert c.get(f"/v1/subjects/{s['id']}", headers=t.auth).status_code == 404
    # Nothing new can be started under the ended contract.
    r = c.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "Q"}, headers=t.auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "contract_not_active"
    cert = c.get(f"/v1/contracts/{t.contract_id}/certificate", headers=t.auth).json()
    assert cert["document"]["destroyed"]["objects"] >= 1
    service_key = signing.public_b64(signing.load_or_create(api.svc.settings.key_dir / "signing.pem"))
    assert verify_certificate(
        cert, vault=api.svc.vault, data_dir=api.svc.settings.root, service_public_key=service_key
    ).ok
    reg = c.get("/v1/register", headers=t.auth).json()
    assert reg["chain_ok"]
    actions = [e["action"] for e in reg["entries"]]
    for a in ("contract_started", "subject_created", "photo_received", "photo_anonymised", "contract_terminated"):
        assert a in actions
    assert "Janssens" not in str(reg)  # the register names objects by id, never people


def test_a_returned_export_is_handed_over_then_shredded(api: Api) -> None:
    """P8 'return': the archive reaches the controller through the API and the service's copy
    goes when receipt is confirmed (it used to sit in exports/ in clear, with no way to fetch or
    delete it, while the certificate said it had been handed over)."""
    import hashlib
    import io
    import zipfile

    from dataprotection.tenancy import create_token

    c = api.client
    t = api.tenant()
    s = c.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan Janssens"}, headers=t.auth).json()
    c.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "P", "subject_id": s["id"]}, headers=t.auth)
    url = f"/v1/contracts/{t.contract_id}/export"
    r = c.get(url, headers=t.auth)
    assert r.status_code == 409 and "not ended" in r.json()["error"]["message"]
    r = c.post(f"/v1/contracts/{t.contract_id}/terminate", json={"disposition": "return"}, headers=t.auth)
    assert r.status_code == 200, r.text
    cert = c.get(f"/v1/contracts/{t.contract_id}/certificate", headers=t.auth).json()["document"]
    assert cert["export"]["service_copy_deleted_by"]  # the promised deadline is in the signed text
    with api.svc.factory.begin() as db:
        reader = create_token(db, tenant_id=t.id, name="reader", scopes=["read"]).secret
    assert c.get(url, headers={"Authorization": f"Bearer {reader}"}).status_code == 403  # admin scope only
    r = c.get(url, headers=t.auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["cache-control"] == "private, no-store"
    assert hashlib.sha256(r.content).hexdigest() == cert["export"]["sha256"]
    # Whole or not at all: a range request gets the whole archive (no undeclared 206/416).
    whole = c.get(url, headers=t.auth | {"Range": "bytes=0-9"})
    assert whole.status_code == 200 and whole.content == r.content
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert any("subject" in n for n in names), names
    exports = api.svc.settings.root / "exports"
    assert [p.name for p in exports.iterdir() if not p.name.endswith(".lock")] == [f"{t.contract_id}-export.zip"]
    r = c.delete(url, headers=t.auth)
    assert r.status_code == 204
    assert not [p for p in exports.iterdir() if not p.name.endswith(".lock")], "the service's copy is gone"
    assert c.get(url, headers=t.auth).status_code == 409
    assert c.delete(url, headers=t.auth).status_code == 409
    actions = [e["action"] for e in c.get("/v1/register", headers=t.auth).json()["entries"]]
    assert actions[-3:] == ["export_downloaded", "export_downloaded", "export_deleted"]
