"""The access log an operator reads: one JSON line per request on `siteplan.access`, on by
default, with method, route template, status, duration and tenant id; no path ids, query
strings, bodies, addresses or tokens."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.api.conftest import open_sqlite_api


def lines(caplog: pytest.LogCaptureFixture) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "siteplan.access"]


def test_one_structured_line_per_request_without_personal_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="siteplan.access")
    with open_sqlite_api(tmp_path) as api:
        t = api.tenant()
        name = "Jan Janssens"
        r = api.client.post(
            "/v1/projects", json={"contract_id": t.contract_id, "reference": f"Carport {name}"}, headers=t.auth
        )
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        assert api.client.get(f"/v1/projects/{pid}?q={name.replace(' ', '+')}", headers=t.auth).status_code == 200
        assert api.client.get(f"/v1/projects/{pid}").status_code == 401
        assert api.client.get("/v1/projects/no-such-project", headers=t.auth).status_code == 404
        assert api.client.get("/v1/health").status_code == 200
    got = lines(caplog)
    assert [(x["method"], x["route"], x["status"]) for x in got] == [
        ("POST", "/v1/projects", 201),
        ("GET", "/v1/projects/{project_id}", 200),
        ("GET", "/v1/projects/{project_id}", 401),
        ("GET", "/v1/projects/{project_id}", 404),
        ("GET", "/v1/health", 200),
    ]
    assert [x["tenant"] for x in got] == [t.id, t.id, None, t.id, None]
    for x in got:
        assert set(x) == {"method", "route", "status", "duration_ms", "tenant"}
        assert isinstance(x["duration_ms"], float) and x["duration_ms"] >= 0
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "siteplan.access")
    for secret in (pid, "Janssens", t.token, "testclient", "no-such-project"):
        assert secret not in text


def test_a_route_that_fails_is_logged_with_the_500_it_answered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="siteplan.access")
    with open_sqlite_api(tmp_path) as api:
        t = api.tenant()

        def broken(*_: object, **__: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr("api.deps.tenant_session", broken)
        r = api.client.get("/v1/projects", headers=t.auth)
        assert r.status_code == 500
    (line,) = [x for x in lines(caplog) if x["route"] == "/v1/projects"]
    assert line["status"] == 500 and line["tenant"] == t.id
