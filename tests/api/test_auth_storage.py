"""Tokens (scopes, expiry, rotation), rate limits, and the schema migrations on both databases."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import struct
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from api.app import create_app
from api.services import RateLimiter
from dataprotection.tenancy import create_contract, create_tenant, create_token, rotate_token, verify_token
from siteplan.db import ApiToken, Base, make_engine, migrate
from tests.api.conftest import Api, make_settings


def test_migrations_build_exactly_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    migrate(engine)
    migrate(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"the models and the migrations differ: {diff}"


def test_token_expiry_rotation_and_hashing(tmp_path: Path, db_url: str) -> None:
    app = create_app(make_settings(tmp_path, db_url, token_cache_s=0), background=False)
    with TestClient(app) as client:
        svc = app.state.services
        with svc.factory.begin() as db:
            t = create_tenant(db, svc.vault.keys, label="A")
            create_contract(db, svc.vault.keys, tenant_id=t.id)
            old = create_token(db, tenant_id=t.id, name="app", scopes=["read"])
            short = create_token(db, tenant_id=t.id, name="app", scopes=["read"], days=1)
            # The secret is never stored, only its hash.
            assert all(old.secret not in (r.secret_hash or "") for r in db.query(ApiToken))
        auth = {"Authorization": f"Bearer {old.secret}"}
        assert client.get("/v1/tenant", headers=auth).status_code == 200
        with svc.factory.begin() as db:
            new = rotate_token(db, token_id=old.token.id)
        assert client.get("/v1/tenant", headers=auth).status_code == 401
        assert client.get("/v1/tenant", headers={"Authorization": f"Bearer {new.secret}"}).status_code == 200
        with svc.factory.begin() as db:
            db.get(ApiToken, short.token.id).expires_at = datetime.now(UTC) - timedelta(seconds=1)  # type: ignore[union-attr]
        assert client.get("/v1/tenant", headers={"Authorization": f"Bearer {short.secret}"}).status_code == 401
        with svc.factory() as db:
            assert verify_token(db, "not-a-token") is None
    svc.factory.kw["bind"].dispose()


def test_rate_limit_per_token(tmp_path: Path) -> None:
    app = create_app(
        make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", rate_limit_per_minute=60, rate_limit_burst=5),
        background=False,
    )
    with TestClient(app) as client:
        api = Api(client, app.state.services, app)
        a, b = api.tenant("A"), api.tenant("B")
        codes = [client.get("/v1/tenant", headers=a.auth).status_code for _ in range(8)]
        assert codes[:5] == [200] * 5 and codes[-1] == 429
        r = client.get("/v1/tenant", headers=a.auth)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        # Another token is not slowed down by the first one's burst.
        assert client.get("/v1/tenant", headers=b.auth).status_code == 200


def test_rate_limit_is_one_budget_for_all_server_processes(tmp_path: Path) -> None:
    """`siteplan serve --workers N` runs N apps on one data folder: a token's budget is shared,
    not N times the limit."""
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", rate_limit_per_minute=1, rate_limit_burst=6
    )
    app1, app2 = create_app(settings, background=False), create_app(settings, background=False)
    with TestClient(app1) as c1, TestClient(app2) as c2:
        t = Api(c1, app1.state.services, app1).tenant("A")
        codes = [c.get("/v1/tenant", headers=t.auth).status_code for _ in range(5) for c in (c1, c2)]
    assert codes.count(200) == 6 and codes[6:] == [429] * 4, codes


def _take(directory: str, n: int) -> int:
    limiter = RateLimiter(1, 30, Path(directory))
    return sum(limiter.take("token-1") == 0 for _ in range(n))


def test_rate_limiter_buckets_are_shared_across_os_processes(tmp_path: Path) -> None:
    """Real processes taking from one bucket at the same time: exactly the burst gets through."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        allowed = pool.starmap(_take, [(str(tmp_path), 25)] * 3)
    assert sum(allowed) == 30, allowed
    # A torn or unreadable bucket (a crash mid-write, a file from before a reboot) starts full.
    (only,) = list(tmp_path.iterdir())
    only.write_bytes(b"\x00" * 5)
    assert RateLimiter(1, 2, tmp_path).take("token-1") == 0
    only.write_bytes(struct.pack("<dd", 0.0, 1e300))  # last update "after" now: a reboot
    assert RateLimiter(1, 2, tmp_path).take("token-1") == 0
    assert RateLimiter(1, 2, tmp_path).take("token-1") == 0
    assert RateLimiter(1, 2, tmp_path).take("token-1") >= 1


def test_rate_limiter_never_takes_the_api_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its folder removed: made again, limits still hold. Unwritable: requests go through, logged
    once, and limits come back when it can be written again. Idle buckets are swept."""
    d = tmp_path / "ratelimit"
    lim = RateLimiter(1, 2, d)
    shutil.rmtree(d)
    assert [lim.take("t") for _ in range(3)][-1] >= 1  # folder made again, burst of 2 enforced
    shutil.rmtree(d)
    d.write_bytes(b"")  # a file where the folder should be: every open fails (even as root)
    with caplog.at_level(logging.ERROR, logger="api.services"):
        assert [lim.take("t") for _ in range(5)] == [0.0] * 5
    assert [r.getMessage() for r in caplog.records].count(
        "rate limits are off: their folder cannot be written (Not a directory)"
    ) == 1
    d.unlink()
    assert [lim.take("t") for _ in range(3)][-1] >= 1
    # Sweeping: a bucket untouched for longer than it takes to refill goes; a recent one stays.
    lim.take("other")
    (old, new) = sorted(d.iterdir(), key=lambda p: p.stat().st_mtime)
    os.utime(old, (time.time() - lim.idle_s - 5,) * 2)
    assert lim.sweep() == 1 and not old.exists() and new.exists()


def test_metrics_in_prometheus_format(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'm.sqlite'}"), background=False)
    with TestClient(app) as client:
        api = Api(client, app.state.services, app)
        t = api.tenant()
        pid = client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": "x"}, headers=t.auth).json()
        client.post(
            f"/v1/projects/{pid['id']}/uploads", headers=t.auth | {"Tus-Resumable": "1.0.0", "Upload-Length": "10"}
        )
        r = client.get("/metrics")
        assert r.status_code == 200
        fams = {f.name: f for f in text_string_to_metric_families(r.text)}
        assert {"siteplan_jobs", "siteplan_queue_depth", "siteplan_photos", "siteplan_stage_seconds"} <= set(fams)
        uploading = [s.value for s in fams["siteplan_photos"].samples if s.labels.get("state") == "uploading"]
        assert uploading == [1.0]
        assert t.id not in r.text  # counts only, no tenant ids
