"""Cross-tenant isolation on every endpoint, generated from the app's route table (MISSION P1, P2).

A new route is covered automatically: every /v1 route is called with tenant B's token on tenant
A's resources and must answer 404 (never 403, never data); every route without a path id is
called by B and must not mention any of A's ids. A route with a path parameter this file does not
know fails the test, so nobody can add one without saying which tenant's resource it names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI

from tests.api.conftest import Api
from tests.api.populate import World, populate

JPEG = (Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg").__next__().read_bytes()

# A plausible body per route, so the request reaches the ownership check instead of failing
# validation first. Routes not listed get an empty JSON object.
BODIES = {
    ("POST", "/v1/contracts/{contract_id}/terminate"): {"disposition": "destroy"},
    ("PATCH", "/v1/subjects/{subject_id}"): {"name": "X"},
    ("POST", "/v1/projects/{project_id}/designs"): {"descriptor": {"units": "mm"}},
    ("POST", "/v1/projects/{project_id}/jobs"): {
        "design_id": "0" * 32,
        "reference": {"segments": []},
        "placement": {"site": {"position": [0, 0]}},
    },
    ("POST", "/v1/jobs/{job_id}/measure"): {"segments": [{"image": "0" * 32, "a": [1, 1], "b": [90, 1]}]},
}
TUS = {"Tus-Resumable": "1.0.0", "Upload-Length": "10", "Upload-Offset": "0"}


def routes(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app serves under /v1, from its own route table (its OpenAPI)."""
    out = []
    for path, ops in app.openapi()["paths"].items():
        if path.startswith("/v1"):
            out += [
                (m.upper(), path)
                for m in sorted(ops)
                if m in ("get", "post", "put", "patch", "delete", "head", "options")
            ]
    return out


def call(api: Api, method: str, path: str, headers: dict[str, str], body: object | None = None):  # type: ignore[no-untyped-def]
    h = headers | TUS
    if method == "PATCH" and path.startswith("/v1/uploads"):
        return api.client.request(
            method,
            path,
            content=b"\xff\xd8\xff" + b"0" * 7,
            headers=h | {"Content-Type": "application/offset+octet-stream"},
        )
    if method == "PUT" and path.endswith("/file"):
        return api.client.request(method, path, content=b"glTF", headers=h | {"Content-Type": "model/gltf-binary"})
    if method in ("POST", "PATCH", "PUT"):
        return api.client.request(method, path, json=body if body is not None else {}, headers=h)
    return api.client.request(method, path, headers=h)


@pytest.fixture
def worlds(api: Api) -> tuple[World, World]:
    return populate(api, api.tenant("A"), JPEG), populate(api, api.tenant("B"), JPEG)


def test_every_route_needs_a_token(api: Api) -> None:
    table = routes(api.app)
    assert len(table) >= 25
    for method, path in table:
        if path == "/v1/health":
            continue
        r = call(api, method, re.sub(r"{(\w+)}", "0123abcd", path), {})
        assert r.status_code == 401, (method, path, r.status_code)
        assert method == "HEAD" or set(r.json()) == {"error"}
        r = call(api, method, re.sub(r"{(\w+)}", "0123abcd", path), {"Authorization": "Bearer sp_forged"})
        assert r.status_code == 401, (method, path)


def test_no_route_reaches_another_tenants_data(api: Api, worlds: tuple[World, World]) -> None:
    a, b = worlds
    a_ids = set(a.ids.values()) - {"plan.glb"}
    checked = 0
    for method, path in routes(api.app):
        params = re.findall(r"{(\w+)}", path)
        unknown = [p for p in params if p not in a.ids]
        assert not unknown, f"{method} {path}: add {unknown} to populate() so isolation is tested"
        body = BODIES.get((method, path))
        if params:
            r = call(api, method, path.format(**a.ids), b.tenant.auth, body)
            assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
            assert method == "HEAD" or r.json()["error"]["code"] == "not_found"
        else:
            r = call(api, method, path, b.tenant.auth, body)
            assert r.status_code < 500, (method, path, r.status_code)
        assert not any(i in r.text for i in a_ids), (method, path, "leaks an id of tenant A")
        # The owner still reaches the same resource with the same request shape (the 404 above is
        # the tenant check, not a malformed request).
        if params and method == "GET":
            r = call(api, method, path.format(**a.ids), a.tenant.auth)
            assert r.status_code in (200, 409), (method, path, r.status_code, r.text[:200])
        checked += 1
    assert checked >= 25
    # Search on B's blind index never finds A's subject, even by A's exact name.
    r = api.client.get("/v1/subjects", params={"q": "Janssens"}, headers=b.tenant.auth)
    assert {s["id"] for s in r.json()["items"]} == {b.ids["subject_id"]}
    # A's contract id in B's request body is "no such contract", not "forbidden".
    r = api.client.post(
        "/v1/projects", json={"contract_id": a.ids["contract_id"], "reference": "x"}, headers=b.tenant.auth
    )
    assert r.status_code == 422 and "no such contract" in r.json()["error"]["message"]


def test_data_layer_scopes_every_query(api: Api, worlds: tuple[World, World]) -> None:
    """The tenant filter lives in the session, not in the routes: a raw ORM query sees one tenant."""
    from sqlalchemy import select

    from siteplan.db import Base, Photo, Project, TenantScoped

    a, b = worlds
    with api.scoped(b.tenant.id) as db:
        for mapper in Base.registry.mappers:
            cls = mapper.class_
            if issubclass(cls, TenantScoped):
                rows = db.scalars(select(cls)).all()
                assert all(r.tenant_id == b.tenant.id for r in rows), cls.__name__
        assert db.get(Project, a.ids["project_id"]) is None
        assert db.get(Photo, a.ids["photo_id"]) is None
        # Writing a row for another tenant is refused at flush.
        db.add(Project(tenant_id=a.tenant.id, contract_id=a.ids["contract_id"], reference_enc="x"))
        with pytest.raises(PermissionError):
            db.flush()


def test_missing_scope_is_refused(api: Api) -> None:
    t = api.tenant("Reader", scopes=("read",))
    r = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "x"}, headers=t.auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert api.client.get("/v1/projects", headers=t.auth).status_code == 200
