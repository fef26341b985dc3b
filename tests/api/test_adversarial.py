"""The adversarial rerun of issue 24 (scripts/adversarial.py), bounded, against two real servers;
and one focused test per defect that rerun found."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import api.routes.photos as photos_route
from api.app import create_app
from privacy.lifecycle import contract_lock, terminate_contract
from privacy.rights import erase_subject
from siteplan.db import Subject
from siteplan.paths import lifecycle_paths
from tests.api.conftest import Api, make_settings

ROOT = Path(__file__).parents[2]
JPEG = sorted((ROOT / "sample_data" / "photos").glob("*.jpg"))[0].read_bytes()
TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Iterator[Api]:
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'siteplan.db'}"), background=False)
    with TestClient(app) as client:
        yield Api(client, app.state.services, app)
    app.state.services.factory.kw["bind"].dispose()


@pytest.mark.parametrize("ending", ["erase", "terminate"])
def test_an_ending_between_a_patchs_check_and_its_first_write_makes_nothing_again(
    sqlite_app: Api, monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    """The erasure or termination lands after the PATCH checked its row (under the upload's
    lock) and before it opened the staging: the PATCH answers 404/410 and makes nothing on disk.
    Before, it made the staging directory again with a sealed header in it (erasure), or asked
    for the destroyed key (termination: a 500)."""
    api = sqlite_app
    t = api.tenant()
    r = api.client.post("/v1/subjects", json={"contract_id": t.contract_id, "name": "Jan"}, headers=t.auth)
    subject = r.json()["id"]
    r = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "R", "subject_id": subject}, headers=t.auth)
    pid = r.json()["id"]
    r = api.client.post(f"/v1/projects/{pid}/uploads", headers=t.auth | TUS | {"Upload-Length": str(len(JPEG))})
    loc = r.headers["Location"]
    svc = api.svc
    real = photos_route._begin_patch
    calls = []

    def begin_then_end(*a, **kw):  # type: ignore[no-untyped-def]
        out = real(*a, **kw)
        calls.append(1)
        if len(calls) == 2:  # the check under the upload's lock: the ending comes right after it
            if ending == "erase":
                with svc.factory() as db, contract_lock(lifecycle_paths(svc.settings), t.contract_id):
                    s = db.get(Subject, subject)
                    erase_subject(db, svc.vault, s, svc.settings.uploads_dir)  # type: ignore[arg-type]
                    db.commit()
            else:
                paths = lifecycle_paths(svc.settings)
                terminate_contract(svc.factory, svc.vault, paths, contract_id=t.contract_id, disposition="destroy")
        return out

    monkeypatch.setattr(photos_route, "_begin_patch", begin_then_end)
    h = t.auth | TUS | {"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    r = api.client.patch(loc, content=JPEG, headers=h)
    assert r.status_code in (404, 410), (r.status_code, r.text)
    root = svc.settings.uploads_dir / t.contract_id
    left = [str(p.relative_to(root)) for p in root.rglob("*")] if root.exists() else []
    assert not [n for n in left if not n.endswith(".lock")], left


def _adversarial():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("adversarial", ROOT / "scripts" / "adversarial.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["adversarial"] = mod
    spec.loader.exec_module(mod)
    return mod
