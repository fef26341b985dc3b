"""API test fixtures: a fresh app per test on SQLite, and the same on PostgreSQL.

PostgreSQL is the production store, so the data layer and API tests run against both. Each
PostgreSQL test gets its own database, created and dropped here. If the server cannot be
reached the tests fail (``.ci/run`` starts it); they are never skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from api.services import Services
from dataprotection.tenancy import create_contract, create_tenant, create_token
from siteplan.db import tenant_session
from siteplan.settings import Settings
from tests.pg import throwaway_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'siteplan.db'}"
        return
    with throwaway_database("siteplan_t") as url:
        yield url


@dataclass
class Tenant:
    id: str
    contract_id: str
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Api:
    client: TestClient
    svc: Services
    app: FastAPI

    def tenant(self, label: str = "Acme Gates", scopes: tuple[str, ...] = ("upload", "read", "admin")) -> Tenant:
        with self.svc.factory.begin() as db:
            t = create_tenant(db, self.svc.vault.keys, label=label)
            c = create_contract(db, self.svc.vault.keys, tenant_id=t.id)
            tok = create_token(db, tenant_id=t.id, name="test", scopes=list(scopes))
            return Tenant(t.id, c.id, tok.secret)

    def scoped(self, tenant_id: str):  # type: ignore[no-untyped-def]
        return tenant_session(self.svc.factory, tenant_id)


def make_settings(tmp_path: Path, db_url: str, **kw: object) -> Settings:
    base: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": db_url,
        "rate_limit_per_minute": 100_000,
        "rate_limit_burst": 100_000,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[Api]:
    app = create_app(make_settings(tmp_path, db_url), background=False)
    with TestClient(app) as client:
        yield Api(client, app.state.services, app)
    app.state.services.factory.kw["bind"].dispose()


@contextmanager
def open_sqlite_api(tmp_path: Path, **settings: object) -> Iterator[Api]:
    """The app on SQLite with some settings changed (limits, say), without the background runner."""
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'siteplan.db'}", **settings), background=False)
    with TestClient(app) as client:
        yield Api(client, app.state.services, app)


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    with open_sqlite_api(tmp_path) as api:
        yield api


class LiveServer:
    """The app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live(tmp_path: Path, db_url: str) -> Iterator[tuple[LiveServer, Api]]:
    app = create_app(make_settings(tmp_path, db_url), background=False)
    server = LiveServer(app)
    try:
        with TestClient(app) as client:
            yield server, Api(client, app.state.services, app)
    finally:
        server.stop()
        app.state.services.factory.kw["bind"].dispose()
