"""Schemathesis against the app's own OpenAPI: at least 1,000 generated requests, no 500, and
every response conforms to the schema (status codes, headers, bodies).

Schemathesis's pytest plugin does not load with this pytest, so the operations are driven here
with Hypothesis directly (the same strategies and checks the plugin uses).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from dataprotection.tenancy import create_contract
from tests.api.conftest import Api, make_settings
from tests.api.populate import populate

JPEG = (Path(__file__).parents[2] / "sample_data" / "photos").glob("*.jpg").__next__().read_bytes()
EXAMPLES = 60
# "A schema-valid request must be accepted": not a rule here. A body that names a contract,
# design or photo the caller does not have is well-formed and still answers 422 (or 404/409),
# by design. Every other check (no 5xx, status codes, headers, content types, bodies) runs.
EXCLUDED = [positive_data_acceptance]


def _order(label: str) -> float:
    """Operations that end things run last (deletions, then the termination, then its export), so
    that the others reach live resources first and the export's 200 path is reached at all."""
    if label.endswith("contracts/{contract_id}/export"):
        return 4 if label.startswith("DELETE") else 3
    if label.endswith("/terminate"):
        return 2
    if label.startswith("DELETE"):
        return 1 if "/subjects/" not in label else 1.5  # erasing the client takes its media too
    return 0


def _aim(case, ids: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """Point a generated request at the tenant's real resources: its path parameters and the ids
    its body names. Random ids only ever reach the 404 and 422 paths."""
    for k in list(case.path_parameters or {}):
        if k in ids:
            case.path_parameters[k] = ids[k]
    if isinstance(case.body, dict):
        for k in list(case.body):
            if k in ids:
                case.body[k] = ids[k]
    if "/uploads" in case.path:  # as a tus client always does
        case.headers = {**(case.headers or {}), "Tus-Resumable": "1.0.0"}


@schemathesis.serializer(
    "application/offset+octet-stream",
    "model/gltf-binary",
    "model/obj",
    "model/stl",
    "application/sla",
    "application/ply",
    "model/vnd.collada+xml",
)
def _binary(ctx, value):  # type: ignore[no-untyped-def]
    """Raw bytes bodies (tus chunks, design files)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


@pytest.mark.slow
def test_api_conforms_to_its_schema(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'siteplan.db'}"), background=False)
    sent = 0
    failures: dict[str, str] = {}
    with TestClient(app) as client:
        api = Api(client, app.state.services, app)
        t = api.tenant("Fuzz")
        world = populate(api, t, JPEG)
        # A second contract of the tenant, ended with its data returned: the export's own paths.
        with api.svc.factory.begin() as db:
            ended = create_contract(db, api.svc.vault.keys, tenant_id=t.id).id
        r = client.post(f"/v1/contracts/{ended}/terminate", json={"disposition": "return"}, headers=t.auth)
        assert r.status_code == 200, r.text
        statuses: Counter[tuple[str, int]] = Counter()
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = sorted((r.ok() for r in schema.get_all_operations()), key=lambda op: _order(op.label))
        assert len(operations) >= 25
        aimed = 0
        for op in operations:

            @given(case=op.as_strategy(), real=st.booleans())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            def run(case, real: bool) -> None:  # type: ignore[no-untyped-def]
                nonlocal sent, aimed
                sent += 1
                label = case.operation.label
                if real:  # half the requests hit the tenant's own resources
                    handover = label.endswith(("contracts/{contract_id}/export", "/certificate"))
                    _aim(case, {**world.ids, "contract_id": ended} if handover else world.ids)
                    aimed += 1
                resp = case.call_and_validate(headers=t.auth, excluded_checks=EXCLUDED)
                statuses[(label, resp.status_code)] += 1

            try:
                run()
            except Exception as exc:
                failures[op.label] = str(exc)[:1500]
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    print(f"schemathesis: {sent} generated requests ({aimed} at real resources) over {len(operations)} operations")
    assert sent >= 1000, f"only {sent} generated requests"
    # The requests reached the live paths, not only 404s and 422s.
    ok = {label for (label, code), _ in statuses.items() if 200 <= code < 300}
    for must in (
        "GET /v1/projects/{project_id}",
        "GET /v1/photos/{photo_id}/content",
        "GET /v1/jobs/{job_id}/plan/{name}",
        "GET /v1/contracts/{contract_id}/certificate",
        "GET /v1/subjects/{subject_id}/export",
        "GET /v1/contracts/{contract_id}/export",
        "DELETE /v1/contracts/{contract_id}/export",
    ):
        assert must in ok, f"{must}: never a 2xx ({sorted(c for (lb, c) in statuses if lb == must)})"
    never = sorted({op.label for op in operations} - ok)
    print(f"{len(ok)} of {len(operations)} operations answered 2xx at least once; never: {never}")
