"""Hostile values in every JSON body the API takes (POST/PUT/PATCH): NaN, Infinity, 1e400, huge,
zero and negative numbers, unknown fields at every depth and lone surrogates in every string.
Never a 5xx, never a 2xx for an input that cannot work, never an unknown field stored.

Each body starts from one the API accepts; every mutation of it is sent (an exhaustive walk of its
leaves), and Hypothesis then draws arbitrary numbers for a job's coordinates and lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import create_app
from dataprotection.tenancy import create_contract
from siteplan.db import Photo
from tests.api.conftest import Api, Tenant, make_settings
from tests.api.json_mutations import NOT_FINITE_OR_HUGE, RawNumber, dumps, leaves, replaced
from tests.api.populate import World, populate

JPEG = next((Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg")).read_bytes()
MARKER = "zq-note-voordeur-marker"
W, H = 4000, 3000  # the uploaded size of the photo the job bodies name


BAD_NUMBERS: list[Any] = NOT_FINITE_OR_HUGE


def mutations(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(what, mutated body): each one an input that cannot work."""
    for path, v in leaves(body):
        where = ".".join(map(str, path)) or "body"
        if isinstance(v, dict):
            yield f"unknown field in {where}", replaced(body, path, {**v, "note": MARKER})
        elif isinstance(v, str):
            yield f"lone surrogate in {where}", replaced(body, path, v[:1] + "\ud800" + v[1:])
        elif isinstance(v, int | float) and not isinstance(v, bool):
            for bad in BAD_NUMBERS:
                yield f"{bad if not isinstance(bad, RawNumber) else bad.token} in {where}", replaced(body, path, bad)


def _ready_photo(api: Api, t: Tenant, project_id: str) -> str:
    """An anonymised photo whose uploaded size is known (W x H), for the job bodies to name."""
    obj = api.svc.vault.put(t.contract_id, JPEG)
    with api.svc.factory.begin() as db:
        p = Photo(
            tenant_id=t.id,
            project_id=project_id,
            contract_id=t.contract_id,
            length=len(JPEG),
            state="anonymised",
            object=obj.object_id,
            sha256=obj.sha256,
            intrinsics={"width": W, "height": H, "original_width": W, "original_height": H, "orientation": 1},
        )
        db.add(p)
        db.flush()
        return p.id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Api, World, dict[str, Any], Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'siteplan.db'}"), background=False)
    with TestClient(app) as client:
        api = Api(client, app.state.services, app)
        t = api.tenant("Hostile")
        w = populate(api, t, JPEG)
        photo = _ready_photo(api, t, w.ids["project_id"])
        with api.svc.factory.begin() as db:
            spare = create_contract(db, api.svc.vault.keys, tenant_id=t.id).id
        ids = {**w.ids, "spare_contract": spare, "ready_photo": photo}
        w.ids.update(ids)
        bodies: dict[str, Any] = {
            "POST /v1/contracts": {"starts_on": "2026-01-05"},
            "POST /v1/contracts/{contract_id}/terminate": {"disposition": "destroy"},
            "POST /v1/subjects": {"contract_id": t.contract_id, "name": "Jan", "address": "Dorp 1", "phone": "012"},
            "PATCH /v1/subjects/{subject_id}": {"name": "Jan", "address": "Dorp 2", "phone": "013"},
            "POST /v1/projects": {"contract_id": t.contract_id, "reference": "P-2", "subject_id": w.ids["subject_id"]},
            "POST /v1/projects/{project_id}/designs": {
                "descriptor": {"name": "gate", "units": "m", "anchor": [0.5, 0.0, 0.0], "scalable": True}
            },
            "POST /v1/projects/{project_id}/jobs": {
                "design_id": w.ids["design_id"],
                "reference": {
                    "segments": [{"image": photo, "a": [100.0, 200.0], "b": [900.5, 250.0], "length_m": 4.5}],
                    "markers": [{"dictionary": "DICT_4X4_50", "id": 0, "size_m": 0.2}],
                },
                "placement": {"image": photo, "ground_points": [[1000.0, 2500.0], [2000.0, 2600.0]]},
            },
            "POST /v1/projects/{project_id}/jobs#site": {
                "design_id": w.ids["design_id"],
                "reference": {"segments": [{"image": photo, "a": [10, 20], "b": [300, 20], "length_m": 2}]},
                "placement": {"site": {"position": [1.5, -2.0, 0.0], "rotation_deg": 30.0}},
            },
            # The populated job has no site model: the valid body answers 409/404, the hostile
            # ones must be refused before that.
            "POST /v1/jobs/{job_id}/measure": {
                "segments": [{"image": photo, "a": [100.0, 200.0], "b": [900.5, 250.0]}],
            },
            "POST /v1/projects/{project_id}/jobs#point": {
                "design_id": w.ids["design_id"],
                "reference": {"segments": [{"image": photo, "a": [10, 20], "b": [300, 20], "length_m": 2}]},
                "placement": {"image": photo, "ground_point": [50, 60], "rotation_deg": -15},
            },
        }
        yield api, w, bodies, tmp
    app.state.services.factory.kw["bind"].dispose()


def _url(label: str, ids: dict[str, str]) -> tuple[str, str]:
    method, path = label.split("#")[0].split(" ")
    if path.endswith("/terminate"):  # a contract of its own: a valid body would end it
        path = path.replace("{contract_id}", ids["spare_contract"])
    for k, v in ids.items():
        path = path.replace("{" + k + "}", v)
    return method, path


def _send(api: Api, w: World, label: str, body: Any) -> Any:
    method, url = _url(label, w.ids)
    headers = {**w.tenant.auth, "Content-Type": "application/json"}
    return api.client.request(method, url, content=dumps(body), headers=headers)


def _stored_bytes(tmp: Path) -> bytes:
    return b"".join(p.read_bytes() for p in tmp.glob("siteplan.db*"))


def test_every_json_body_is_covered(world: tuple[Api, World, dict[str, Any], Path]) -> None:
    api, _, bodies, _ = world
    spec = api.client.get("/openapi.json").json()
    json_writes = {
        f"{m.upper()} {p}"
        for p, ops in spec["paths"].items()
        for m, op in ops.items()
        if m in ("post", "put", "patch") and "application/json" in op.get("requestBody", {}).get("content", {})
    }
    assert json_writes <= {k.split("#")[0] for k in bodies}, sorted(json_writes - {k.split("#")[0] for k in bodies})


def test_hostile_values_are_refused_by_name(world: tuple[Api, World, dict[str, Any], Path]) -> None:
    api, w, bodies, tmp = world
    sent, problems = 0, []
    for label, body in bodies.items():
        if label.endswith("/terminate"):
            # The valid body would end the contract: only the mutations are sent.
            pass
        else:
            ok = _send(api, w, label, body)
            if label.endswith("/measure"):
                assert ok.status_code in (404, 409), (label, ok.status_code, ok.text)
            else:
                assert 200 <= ok.status_code < 300, (label, ok.status_code, ok.text)
        for what, bad in mutations(body):
            r = _send(api, w, label, bad)
            sent += 1
            if r.status_code != 422:
                problems.append(f"{label}: {what}: {r.status_code} {r.text[:200]}")
                continue
            err = r.json()["error"]
            # The one error shape, naming the field (the unknown one, or the bad value's path).
            if not err.get("field"):
                problems.append(f"{label}: {what}: 422 without a field: {err}")
    assert not problems, "\n".join(problems)
    assert sent > 100
    assert MARKER.encode() not in _stored_bytes(tmp), "an unknown field's value reached the database"


def test_numbers_out_of_range_are_refused(world: tuple[Api, World, dict[str, Any], Path]) -> None:
    """Zero and negative where only a positive number can work; clicks outside their photo."""
    api, w, bodies, _ = world
    job = "POST /v1/projects/{project_id}/jobs"
    base = bodies[job]
    cases = {
        ("reference", "segments", 0, "length_m"): [0, -4.5, 0.0, 20_000],
        ("reference", "markers", 0, "size_m"): [0, -0.2],
        ("reference", "markers", 0, "id"): [-1],
        ("reference", "segments", 0, "a", 0): [-1.0, W + 0.5],
        ("reference", "segments", 0, "b", 1): [-0.01, H + 1],
        ("placement", "ground_points", 0, 1): [-5.0, H + 10],
        ("placement", "ground_points", 1, 0): [W + 1],
    }
    for path, values in cases.items():
        for v in values:
            r = _send(api, w, job, replaced(base, path, v))
            assert r.status_code == 422, (path, v, r.status_code, r.text)
            field = r.json()["error"]["field"]
            assert field and field.startswith(".".join(map(str, path[:3]))), (path, v, field)
    # A segment shorter than 5 pixels, and a reference with nothing to scale from.
    short = replaced(base, ("reference", "segments", 0, "b"), [102.0, 201.0])
    short = replaced(short, ("reference", "markers"), [])
    assert _send(api, w, job, short).status_code == 422
    empty = replaced(base, ("reference",), {"segments": [], "markers": []})
    assert _send(api, w, job, empty).json()["error"]["field"] == "reference"
    no_length = replaced(base, ("reference", "segments", 0), {"image": w.ids["ready_photo"], "a": [1, 1], "b": [90, 1]})
    r = _send(api, w, job, no_length)
    assert r.status_code == 422 and r.json()["error"]["field"] == "reference.segments.0.length_m"


coord = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(min_value=-10, max_value=W + 10),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(
    a=st.tuples(coord, coord),
    b=st.tuples(coord, coord),
    g=st.tuples(coord, coord),
    length=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1, max_value=50)),
)
def test_generated_job_numbers_never_5xx_never_202_unless_they_can_work(
    world: tuple[Api, World, dict[str, Any], Path], a: Any, b: Any, g: Any, length: Any
) -> None:
    import math

    api, w, bodies, _ = world
    base = bodies["POST /v1/projects/{project_id}/jobs#point"]
    body = replaced(base, ("reference", "segments", 0, "a"), list(a))
    body = replaced(body, ("reference", "segments", 0, "b"), list(b))
    body = replaced(body, ("reference", "segments", 0, "length_m"), length)
    body = replaced(body, ("placement", "ground_point"), list(g))
    r = _send(api, w, "POST /v1/projects/{project_id}/jobs#point", body)
    assert r.status_code < 500, r.text
    if r.status_code == 202:

        def inside(p: Any) -> bool:
            return all(math.isfinite(c) for c in p) and 0 <= p[0] <= W and 0 <= p[1] <= H

        assert inside(a) and inside(b) and inside(g), (a, b, g)
        assert math.isfinite(length) and 0 < length <= 10_000, length
        assert math.dist(a, b) >= 5
    else:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"], r.text
