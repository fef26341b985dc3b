#!/usr/bin/env python
"""The adversarial rerun of issue 24, repeatable: two real `siteplan serve` processes sharing one
data folder and one database, driven over HTTP as a hostile client would, plus kill -9 of a server
mid-upload and of `siteplan contract end` mid-termination, each followed by a restart.

Scenarios (each request is counted by status, under its scenario and route template):
- isolation: every route of the OpenAPI with tenant B's token on tenant A's ids, and A's ids in
  B's bodies, queries and Upload-Metadata;
- scopes: a read-only and an upload-only token on every route;
- tus: the core protocol, its errors, resumes (across the two servers, and after a dropped
  connection) that give a byte-identical anonymised photo;
- D1-D12: NaN / Infinity / 1e400 / zero / negative / huge numbers, unknown fields and lone
  surrogates in every JSON body; malformed JSON; GIF, BMP and other non-photos; odd
  Upload-Length and Upload-Offset; a pixel bomb over the cap; idempotency replays after a
  delete; an upload-only token erasing; a restricted subject's photos after the lift; two
  terminations of one contract at once (API and API, API and CLI); an erasure and a termination
  racing a streaming PATCH on the other server;
- kill -9 of a server mid-upload (the upload then resumes on a restarted server), and of the
  CLI's `contract end` at a chosen step (then run again: one archive, one certificate).

Afterwards: nothing plaintext under the data folder (no JPEG/PNG/glTF, no subject name, street,
design name or unknown-field marker, no SQLite other than the service's), and none of those in
the servers' logs. Exit status 0 only with 0 x 5xx, no violated expectation and a clean disk.

    .venv/bin/python scripts/adversarial.py [--quick] [--json OUT] [--keep DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.api.json_mutations import NOT_FINITE_OR_HUGE, dumps, leaves, replaced  # noqa: E402
from tests.api.server import free_port, wait_healthy  # noqa: E402

SITEPLAN = Path(sys.executable).parent / "siteplan"
PHOTOS = sorted((ROOT / "sample_data" / "photos").glob("*.jpg"))
GLB = ROOT / "sample_data" / "design" / "gate.glb"
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
# Personal data the run types in; none of it may be found on disk (in clear) or in a log.
NAME = "Zqxjansens Vlimmeren"
STREET = "Kwikstraatzq 17"
DESIGN_NAME = "Carport Zqxjansens"
MARKER = "zq-note-voordeur-marker"
SECRETS = [NAME, STREET, DESIGN_NAME, MARKER, "Zqxjansens"]


# -- Counting ------------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    by_scenario: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: list[dict[str, Any]] = field(default_factory=list)  # every 5xx
    violations: list[dict[str, Any]] = field(default_factory=list)  # an answer outside what is expected
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def add(self, scenario: str, method: str, route: str, got: httpx.Response | Exception, expect: Any) -> None:
        status = str(got.status_code) if isinstance(got, httpx.Response) else f"transport:{type(got).__name__}"
        rec = {"scenario": scenario, "method": method, "route": route, "status": status}
        with self.lock:
            self.statuses[status] += 1
            self.by_scenario[scenario][status] += 1
            if isinstance(got, httpx.Response) and got.status_code >= 500:
                self.errors.append(rec | {"body": got.text[:300]})
            elif expect is not None and not _expected(got, expect):
                self.violations.append(rec | {"expected": _show(expect), "body": _body(got)})

    def violation(self, scenario: str, what: str) -> None:
        with self.lock:
            self.violations.append({"scenario": scenario, "what": what})


def _expected(got: httpx.Response | Exception, expect: Any) -> bool:
    if callable(expect):
        return bool(expect(got))
    if not isinstance(got, httpx.Response):
        return "transport" in expect
    return got.status_code in expect


def _show(expect: Any) -> str:
    return getattr(expect, "__doc__", None) or "custom" if callable(expect) else str(sorted(map(str, expect)))


def _body(got: httpx.Response | Exception) -> str:
    return got.text[:200] if isinstance(got, httpx.Response) else repr(got)[:200]


def not_2xx(r: httpx.Response | Exception) -> bool:
    """not 2xx (and no transport error)"""
    return isinstance(r, httpx.Response) and not 200 <= r.status_code < 300


def client_error(r: httpx.Response | Exception) -> bool:
    """4xx"""
    return isinstance(r, httpx.Response) and 400 <= r.status_code < 500


# -- Servers -------------------------------------------------------------------------------------


class Server:
    """One `siteplan serve` in its own session (kill -9 takes its whole group, as a crash would)."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.env = env | {"SITEPLAN_PORT": str(free_port())}
        self.base = f"http://127.0.0.1:{self.env['SITEPLAN_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(SITEPLAN), "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1
        wait_healthy(self.base, self.proc, self.log, 120)

    def sample_rss(self) -> None:
        """The peak resident size of the server and its children so far (VmHWM of each)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        total = 0
        with contextlib.suppress(psutil.Error):
            me = psutil.Process(self.proc.pid)
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error, OSError, ValueError):
                    status = Path(f"/proc/{p.pid}/status").read_text()
                    total += int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]
        self.peak_rss = max(self.peak_rss, total)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.sample_rss()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.sample_rss()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# -- The world the run starts from ---------------------------------------------------------------


@dataclass
class Tenant:
    id: str
    contracts: dict[str, str]  # role -> contract id
    tokens: dict[str, str]  # "admin" | "upload" | "read" -> secret
    ids: dict[str, str] = field(default_factory=dict)  # path parameter -> an id of this tenant

    def auth(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}


CONTRACT_ROLES = ("main", "double", "cli_race", "cli_kill", "race_term", "spare")


def seed(data: Path, db_url: str) -> dict[str, Tenant]:
    """Tenants, contracts and tokens, as `siteplan tenant create` and `token create` make them
    (the same functions, in this process: one start-up instead of a dozen CLI runs)."""
    from dataprotection.tenancy import create_contract, create_tenant, create_token
    from dataprotection.vault import FileKeyStore
    from siteplan.db import init_db
    from siteplan.settings import Settings

    settings = Settings(data_dir=data, database_url=db_url)
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = FileKeyStore(settings.key_dir)
    factory = init_db(settings.db_url, keys)
    out = {}
    with factory.begin() as db:
        for label in ("A", "B"):
            t = create_tenant(db, keys, label=f"Tenant {label}")
            contracts = {role: create_contract(db, keys, tenant_id=t.id).id for role in CONTRACT_ROLES}
            tokens = {
                scope: create_token(db, tenant_id=t.id, name=scope, scopes=scopes).secret
                for scope, scopes in (
                    ("admin", ["upload", "read", "admin"]),
                    ("upload", ["upload"]),
                    ("read", ["read"]),
                )
            }
            out[label] = Tenant(t.id, contracts, tokens)
    factory.kw["bind"].dispose()
    return out


# -- The run -------------------------------------------------------------------------------------


class Run:
    def __init__(self, work: Path, *, quick: bool, seed_: int, db_url: str | None) -> None:
        self.work, self.quick = work, quick
        self.rng = random.Random(seed_)
        self.data = work / "data"
        self.db_url = db_url or f"sqlite:///{self.data / 'siteplan.db'}"
        self.tally = Tally()
        env = os.environ | {
            "SITEPLAN_DATA_DIR": str(self.data),
            "SITEPLAN_DATABASE_URL": self.db_url,
            "SITEPLAN_RATE_LIMIT_PER_MINUTE": "10000000",
            "SITEPLAN_RATE_LIMIT_BURST": "10000000",
            "SITEPLAN_RUN_JOBS": "false",  # jobs are accepted and queued; running them is test_kill9's
            "SITEPLAN_TOKEN_CACHE_S": "0",
            "SITEPLAN_SHUTDOWN_GRACE_S": "5",
        }
        env.pop("SITEPLAN_PORT", None)
        self.env = env
        self.servers = [Server(f"server{i}", env, work / f"server{i}.log") for i in range(2)]
        self.turn = 0
        self.http = httpx.Client(timeout=60)
        self.t: dict[str, Tenant] = {}
        self.job_bodies: dict[str, Any] = {}
        self.job_body: Any = {}
        self.photo_sha: dict[str, str] = {}  # one-shot upload's anonymised sha256, by sample name

    # -- requests --

    def base(self, server: int | None) -> str:
        if server is None:
            live = [s for s in self.servers if s.alive]
            self.turn += 1
            return live[self.turn % len(live)].base
        return self.servers[server].base

    def call(
        self,
        scenario: str,
        method: str,
        route: str,
        *,
        headers: dict[str, str] | None = None,
        expect: Any = None,
        server: int | None = None,
        json_body: Any = None,
        raw: str | None = None,
        content: Any = None,
        params: dict[str, str] | None = None,
        **path: str,
    ) -> httpx.Response | Exception:
        url = self.base(server) + route.format(**path)
        h = dict(headers or {})
        if json_body is not None or raw is not None:
            content = raw if raw is not None else dumps(json_body)
            h.setdefault("Content-Type", "application/json")
        try:
            got: httpx.Response | Exception = self.http.request(method, url, headers=h, content=content, params=params)
        except httpx.TransportError as exc:
            got = exc
        self.tally.add(scenario, method, route, got, expect)
        return got

    def wait_for(self, what: str, cond: Callable[[], Any], limit: float = 60.0) -> Any:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            got = cond()
            if got:
                return got
            time.sleep(0.3)
        self.tally.violation(what, f"not within {limit:.0f} s")
        return None

    # -- building blocks --

    def upload(
        self, scenario: str, t: Tenant, project: str, data: bytes, *, pieces: int = 1, key: str | None = None
    ) -> str | None:
        h = t.auth("upload") | TUS | {"Upload-Length": str(len(data))} | ({"Idempotency-Key": key} if key else {})
        r = self.call(
            scenario, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={201}, project_id=project
        )
        if not isinstance(r, httpx.Response) or r.status_code != 201:
            return None
        upload = r.headers["Location"].rsplit("/", 1)[1]
        step = -(-len(data) // pieces)
        for off in range(0, len(data), step):
            r = self.call(
                scenario,
                "PATCH",
                "/v1/uploads/{upload_id}",
                headers=t.auth("upload") | TUS | OCTETS | {"Upload-Offset": str(off)},
                content=data[off : off + step],
                expect={204},
                upload_id=upload,
            )
        return upload

    def create_upload(self, sc: str, headers: dict[str, str], project: str, *, server: int | None = None) -> str:
        """POST a tus upload (201 expected); its id, or a null id when refused."""
        r = self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=headers,
            expect={201},
            server=server,
            project_id=project,
        )
        ok = isinstance(r, httpx.Response) and r.status_code == 201
        return r.headers["Location"].rsplit("/", 1)[1] if ok else "0" * 32  # type: ignore[union-attr]

    def photo_state(self, scenario: str, t: Tenant, photo: str) -> dict[str, Any]:
        r = self.call(scenario, "GET", "/v1/photos/{photo_id}", headers=t.auth("read"), photo_id=photo)
        return r.json() if isinstance(r, httpx.Response) and r.status_code == 200 else {}

    def wait_anonymised(self, scenario: str, t: Tenant, photos: list[str], limit: float = 90.0) -> dict[str, Any]:
        done: dict[str, Any] = {}

        def all_done() -> bool:
            for p in photos:
                if p not in done:
                    s = self.photo_state(scenario, t, p)
                    if s.get("state") in ("anonymised", "rejected"):
                        done[p] = s
            return len(done) == len(photos)

        self.wait_for(f"{scenario}: photos anonymised", all_done, limit)
        return done

    def make_project(self, scenario: str, t: Tenant, contract: str, *, subject: bool = True) -> dict[str, str]:
        ids: dict[str, str] = {}
        if subject:
            r = self.call(
                scenario,
                "POST",
                "/v1/subjects",
                headers=t.auth(),
                json_body={"contract_id": contract, "name": NAME, "address": STREET, "phone": "0470 12 34 56"},
                expect={201},
            )
            ids["subject_id"] = r.json()["id"]  # type: ignore[union-attr]
        body = {"contract_id": contract, "reference": f"Poort {NAME}"} | (
            {"subject_id": ids["subject_id"]} if subject else {}
        )
        r = self.call(scenario, "POST", "/v1/projects", headers=t.auth(), json_body=body, expect={201})
        ids["project_id"] = r.json()["id"]  # type: ignore[union-attr]
        return ids

    # -- scenarios --

    def build_world(self) -> None:
        """Per tenant: a subject, a project, a design with its file, two anonymised photos, a
        queued job, an unfinished upload; the one-shot anonymised sha256 of a sample photo."""
        sc = "world"
        for label, t in self.t.items():
            ids = self.make_project(sc, t, t.contracts["main"])
            r = self.call(
                sc,
                "POST",
                "/v1/projects/{project_id}/designs",
                headers=t.auth(),
                json_body={"descriptor": {"name": DESIGN_NAME, "units": "m", "anchor": [0.0, 0.0, 0.0]}},
                expect={201},
                project_id=ids["project_id"],
            )
            ids["design_id"] = r.json()["id"]  # type: ignore[union-attr]
            self.call(
                sc,
                "PUT",
                "/v1/designs/{design_id}/file",
                headers=t.auth() | {"Content-Type": "model/gltf-binary"},
                content=GLB.read_bytes(),
                expect={200, 201, 204},
                design_id=ids["design_id"],
            )
            photos = [self.upload(sc, t, ids["project_id"], p.read_bytes()) for p in PHOTOS[: 1 if self.quick else 2]]
            states = self.wait_anonymised(sc, t, [p for p in photos if p])
            ids["photo_id"] = photos[0] or ""
            if label == "A" and photos[0] in states:
                self.photo_sha[PHOTOS[0].name] = states[photos[0]]["sha256"]
            first = states.get(ids["photo_id"], {})
            w, h = first.get("uploaded_width") or 100, first.get("uploaded_height") or 100
            self.job_bodies[label] = {
                "design_id": ids["design_id"],
                "reference": {
                    "segments": [{"image": ids["photo_id"], "a": [10, 20], "b": [w // 2, 20], "length_m": 4.5}]
                },
                "placement": {"image": ids["photo_id"], "ground_points": [[w // 4, h // 2], [w // 2, h // 2]]},
            }
            r = self.call(
                sc,
                "POST",
                "/v1/projects/{project_id}/jobs",
                headers=t.auth(),
                json_body=self.job_bodies[label],
                expect={201, 202},
                project_id=ids["project_id"],
            )
            ids["job_id"] = r.json()["id"] if isinstance(r, httpx.Response) and r.status_code < 300 else "0" * 32
            h2 = t.auth() | TUS | {"Upload-Length": "100000"}
            ids["upload_id"] = self.create_upload(sc, h2, ids["project_id"])
            ids |= {"contract_id": t.contracts["main"], "name": "plan.glb"}
            t.ids = ids
        self.job_body = self.job_bodies["A"]

    def routes(self) -> list[tuple[str, str]]:
        spec = self.http.get(self.base(0) + "/openapi.json").json()
        return [
            (m.upper(), p)
            for p, ops in spec["paths"].items()
            for m in ops
            if p.startswith("/v1") and m in ("get", "post", "put", "patch", "delete", "head", "options")
        ]

    def _any_route(
        self, sc: str, method: str, path: str, headers: dict[str, str], ids: dict[str, str], expect: Any
    ) -> httpx.Response | Exception:
        params = {k: ids.get(k, "0" * 32) for k in re.findall(r"{(\w+)}", path)}
        if path.endswith("/terminate"):
            params["contract_id"] = ids.get("terminate_contract", params["contract_id"])
        h = headers | TUS | {"Upload-Length": "10", "Upload-Offset": "0"}
        if method == "PATCH" and path.startswith("/v1/uploads"):
            return self.call(
                sc, method, path, headers=h | OCTETS, content=b"\xff\xd8\xff" + b"0" * 7, expect=expect, **params
            )
        if method == "PUT":
            h |= {"Content-Type": "model/gltf-binary"}
            return self.call(sc, method, path, headers=h, content=b"glTF", expect=expect, **params)
        body = BODIES.get((method, path), {}) if method in ("POST", "PATCH") else None
        if body is not None:
            body = json.loads(json.dumps(body).replace("@contract", ids.get("contract_id", "0" * 32)))
        return self.call(sc, method, path, headers=h, json_body=body, expect=expect, **params)

    def isolation(self) -> None:
        """B's token on every route with A's ids: never a 2xx except the routes that name no id
        (and those must not show A's data); A's ids in B's bodies, queries and metadata."""
        sc = "isolation"
        a, b = self.t["A"], self.t["B"]
        own = {
            "/v1/health",
            "/v1/tenant",
            "/v1/contracts",
            "/v1/register",
            "/v1/subjects",
            "/v1/projects",
            "/v1/uploads",
        }
        for method, path in self.routes():
            if path in own:
                r = self._any_route(sc, method, path, b.auth(), b.ids | {"contract_id": b.contracts["spare"]}, None)
                if isinstance(r, httpx.Response) and any(v in r.text for v in (a.id, a.ids["project_id"])):
                    self.tally.violation(sc, f"{method} {path} shows tenant A's ids to B")
                continue
            ids = a.ids | {"terminate_contract": a.contracts["main"]}
            self._any_route(sc, method, path, b.auth(), ids, {404, 405, 412})
        # A's ids inside B's bodies.
        bp = b.ids["project_id"]
        for body, route, params in (
            ({"contract_id": a.contracts["main"], "name": "X"}, "/v1/subjects", {}),
            ({"contract_id": a.contracts["main"], "reference": "X"}, "/v1/projects", {}),
            ({"contract_id": b.contracts["main"], "subject_id": a.ids["subject_id"]}, "/v1/projects", {}),
            (
                self.job_bodies["B"] | {"design_id": a.ids["design_id"]},
                "/v1/projects/{project_id}/jobs",
                {"project_id": bp},
            ),
            (
                {
                    "design_id": b.ids["design_id"],
                    "reference": {"segments": [{"image": a.ids["photo_id"], "a": [1, 1], "b": [90, 1], "length_m": 1}]},
                    "placement": {"image": a.ids["photo_id"], "ground_points": [[10, 10], [50, 10]]},
                },
                "/v1/projects/{project_id}/jobs",
                {"project_id": bp},
            ),
            (
                {"segments": [{"image": a.ids["photo_id"], "a": [1, 1], "b": [90, 1]}]},
                "/v1/jobs/{job_id}/measure",
                {"job_id": b.ids["job_id"]},
            ),
        ):
            self.call(sc, "POST", route, headers=b.auth(), json_body=body, expect={404, 409, 422}, **params)
        # Queries: a search for A's subject's name, A's ids as filters, lists with odd paging.
        for params in (
            {"q": "Zqxjansens"},
            {"q": NAME},
            {"contract_id": a.contracts["main"]},
            {"subject_id": a.ids["subject_id"]},
            {"limit": "0"},
            {"limit": "100000"},
            {"offset": "-1"},
            {"offset": "99999999999999999999"},
            {"q": "a" * 5000},
        ):
            for route in ("/v1/subjects", "/v1/projects", "/v1/register", "/v1/contracts"):
                r = self.call(sc, "GET", route, headers=b.auth(), params=params, expect=lambda r: not_5xx(r))
                if isinstance(r, httpx.Response) and r.status_code == 200 and a.ids["subject_id"] in r.text:
                    self.tally.violation(sc, f"GET {route}?{params} shows A's subject")
        # A lone surrogate and an overlong form, percent-encoded in the query.
        for q in ("%ED%B2%80", "%C0%AF", "%00", "%FF%FE"):
            for route in ("/v1/subjects", "/v1/projects"):
                self.call(sc, "GET", route + "?q=" + q, headers=b.auth(), expect=lambda r: not_5xx(r))
        # A's ids in Upload-Metadata (ignored: the upload is B's, in B's project).
        meta = ",".join(f"{k} {_b64(v)}" for k, v in (("project", a.ids["project_id"]), ("filename", NAME)))
        h = b.auth() | TUS | {"Upload-Length": "10", "Upload-Metadata": meta}
        self.call(sc, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={201}, project_id=bp)
        h = b.auth() | TUS | {"Upload-Length": "10", "Upload-Metadata": meta}
        self.call(
            sc, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={404}, project_id=a.ids["project_id"]
        )

    def scopes(self) -> None:
        """A read-only token on every write, an upload-only token on every read: 403."""
        sc = "scopes"
        a = self.t["A"]
        ids = a.ids | {"terminate_contract": a.contracts["spare"]}
        for method, path in self.routes():
            if path == "/v1/health":
                continue
            # Measuring a finished job's site reads it (read scope, docs/api.md).
            writes = method in ("POST", "PUT", "PATCH", "DELETE") and not path.endswith("/measure")
            writes = writes or path.startswith("/v1/uploads")
            if writes or path.endswith("/uploads"):
                self._any_route(sc, method, path, a.auth("read"), ids, {403})
            if method == "GET" and path not in ("/v1/tenant",):
                self._any_route(sc, method, path, a.auth("upload"), ids, {403})
            if (path.startswith("/v1/contracts") and method != "GET") or path.endswith("/export"):
                self._any_route(sc, method, path, a.auth("upload"), ids, {403})
        # No token, a malformed one, a revoked-looking one.
        for h in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer sp_" + "x" * 43},
            {"Authorization": "Basic eA=="},
        ):
            self.call(sc, "GET", "/v1/projects", headers=h, expect={401})

    def tus(self) -> None:
        """The tus core and its errors, a resume across the two servers and one after a dropped
        connection: the anonymised photo is byte-identical to the one-shot upload's."""
        sc = "tus"
        a = self.t["A"]
        pid = a.ids["project_id"]
        up = a.auth("upload")
        self.call(sc, "OPTIONS", "/v1/uploads", headers=up, expect={204})
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=up | {"Upload-Length": "10"},
            expect={412},
            project_id=pid,
        )
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=up | {"Tus-Resumable": "0.2.2", "Upload-Length": "10"},
            expect={412},
            project_id=pid,
        )
        self.call(sc, "POST", "/v1/projects/{project_id}/uploads", headers=up | TUS, expect={400, 422}, project_id=pid)
        big = str(10**12)
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=up | TUS | {"Upload-Length": big},
            expect={413},
            project_id=pid,
        )
        data = PHOTOS[0].read_bytes()
        u = self.create_upload(sc, up | TUS | {"Upload-Length": str(len(data))}, pid)
        route = "/v1/uploads/{upload_id}"
        self.call(
            sc, "PATCH", route, headers=up | TUS | {"Upload-Offset": "0"}, content=data[:10], expect={415}, upload_id=u
        )
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | OCTETS | {"Upload-Offset": "0"},
            content=data[:10],
            expect={412},
            upload_id=u,
        )
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": "5"},
            content=data[:10],
            expect={409},
            upload_id=u,
        )
        self.call(sc, "PATCH", route, headers=up | TUS | OCTETS, content=data[:10], expect={400, 422}, upload_id=u)
        # A chunk past Upload-Length, declared: refused before a byte is read; the upload stays.
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": "0"},
            content=data + b"xx",
            expect={413},
            upload_id=u,
        )
        # Half on server 0, a dropped connection on server 1, the rest on server 1.
        half = len(data) // 2
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": "0"},
            content=data[:half],
            expect={204},
            server=0,
            upload_id=u,
        )
        self.dropped_patch(self.servers[1].base, a, u, half, data[half:], cut=len(data) // 5)
        r = self.call(sc, "HEAD", route, headers=up | TUS, expect={200}, server=1, upload_id=u)
        off = int(r.headers.get("Upload-Offset", "0")) if isinstance(r, httpx.Response) else 0  # type: ignore[union-attr]
        if not half <= off <= len(data):
            self.tally.violation(sc, f"HEAD after a dropped connection says {off}, sent {half}+")
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": str(off)},
            content=data[off:],
            expect={204},
            server=1,
            upload_id=u,
        )
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": str(len(data))},
            content=b"x",
            expect={409, 413},
            upload_id=u,
        )
        st = self.wait_anonymised(sc, a, [u]).get(u, {})
        if self.photo_sha and st.get("sha256") != self.photo_sha[PHOTOS[0].name]:
            self.tally.violation(sc, "the resumed upload's anonymised photo differs from the one-shot upload's")
        # tus termination; a streamed chunk that overflows keeps what came before it.
        u2 = self.create_upload(sc, up | TUS | {"Upload-Length": "300000"}, pid)

        def stream() -> Iterator[bytes]:
            yield data[:200000]
            yield data[:200000]

        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": "0"},
            content=stream(),
            expect={413},
            upload_id=u2,
        )
        r = self.call(sc, "HEAD", route, headers=up | TUS, expect={200}, upload_id=u2)
        self.call(sc, "DELETE", route, headers=up | TUS, expect={204}, upload_id=u2)
        self.call(sc, "HEAD", route, headers=up | TUS, expect={404}, upload_id=u2)
        self.call(sc, "DELETE", route, headers=up | TUS, expect={404}, upload_id=u2)
        self.call(
            sc,
            "PATCH",
            route,
            headers=up | TUS | OCTETS | {"Upload-Offset": "0"},
            content=b"x",
            expect={404},
            upload_id=u2,
        )

    def dropped_patch(self, base: str, t: Tenant, upload: str, offset: int, rest: bytes, *, cut: int) -> None:
        """A PATCH that declares ``len(rest)`` bytes and sends ``cut`` of them, then hangs up."""
        host, port = base.removeprefix("http://").split(":")
        head = (
            f"PATCH /v1/uploads/{upload} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {t.tokens['upload']}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {len(rest)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head + rest[:cut])
            time.sleep(0.3)
        time.sleep(0.5)  # the server notices the drop and seals what arrived

    def odd_headers(self) -> None:
        """tus numbers are digits only (D12); Upload-Offset likewise."""
        sc = "odd-headers"
        a = self.t["A"]
        up, pid = a.auth("upload"), a.ids["project_id"]
        for text in ("+10", "1_000", "-1", "0", "1e3", "0x10", "10.0", "", "9" * 25, "\u0661\u0660", "10 10", "\uff11"):
            v = text.encode()  # raw bytes: Arabic-Indic and full-width digits are digits to Python's int()
            self.call(
                sc,
                "POST",
                "/v1/projects/{project_id}/uploads",
                headers=up | TUS | {"Upload-Length": v},
                expect=client_error,
                project_id=pid,
            )
        u = self.create_upload(sc, up | TUS | {"Upload-Length": "20"}, pid)
        for v in ("+0", "0_0", "-0", "", "0x0", "1e0", "00000000000000000000000000"):
            self.call(
                sc,
                "PATCH",
                "/v1/uploads/{upload_id}",
                headers=up | TUS | OCTETS | {"Upload-Offset": v},
                content=b"x",
                expect=client_error,
                upload_id=u,
            )
        # Content-Length values no HTTP client library sends: over a raw socket.
        for cl in ("-1", "abc", "99999999999999999999999", "1, 2", "+1"):
            self.raw(sc, "PATCH", "/v1/uploads/{upload_id}", a, {"Upload-Offset": "0", "Content-Length": cl}, u)
        self.call(sc, "GET", "/v1/projects", headers=a.auth() | {"X-Big": "x" * 20000}, expect={431})
        # Plan file names that try to leave the job; odd conditional and idempotency headers.
        job = a.ids["job_id"]
        for name in ("..%2F..%2Fkeys", "%2e%2e", "plan.glb%00", "x" * 300, "plan.glb.", "PLAN.GLB", "%C0%AE"):
            self.call(
                sc,
                "GET",
                "/v1/jobs/{job_id}/plan/{name}",
                headers=a.auth(),
                expect={404, 409, 422},
                job_id=job,
                name=name,
            )
        for inm in ('"x"', "*", 'W/"' + "x" * 5000 + '"', "\x7f"):
            self.call(
                sc,
                "GET",
                "/v1/jobs/{job_id}",
                headers=a.auth() | {"If-None-Match": inm},
                expect={200, 304, 400, 422},
                job_id=job,
            )
        for key in ("", "k" * 5000, "\u00e9t\u00e9".encode()):  # bytes: sent as UTF-8
            h = a.auth() | {"Idempotency-Key": key}
            body = {"contract_id": a.contracts["main"], "reference": "idem"}
            self.call(sc, "POST", "/v1/projects", headers=h, json_body=body, expect=lambda r: not_5xx(r))
        for auth in (
            ("Bearer " + "\u00ff" * 40).encode(),
            "Bearer sp_" + "A" * 5000,
            "bearer " + a.tokens["admin"],
            "Bearer  x",
        ):
            self.call(sc, "GET", "/v1/tenant", headers={"Authorization": auth}, expect={200, 401, 431})

    def raw(self, sc: str, method: str, route: str, t: Tenant, headers: dict[str, str], upload: str) -> None:
        """One request written by hand (headers as given), its status read back; counted."""
        host, port = self.base(None).removeprefix("http://").split(":")
        lines = [f"{method} {route.format(upload_id=upload)} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in (t.auth("upload") | TUS | OCTETS | headers).items()]
        got: httpx.Response | Exception
        try:
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"x")
                s.shutdown(socket.SHUT_WR)
                status = s.recv(4096).split(b" ", 2)
            got = (
                httpx.Response(int(status[1]))
                if len(status) > 1 and status[1].isdigit()
                else ConnectionError("no answer")
            )
        except OSError as exc:
            got = exc
        self.tally.add(sc, method, route, got, lambda r: isinstance(r, Exception) or r.status_code < 500)

    def file_types(self) -> None:
        """Exactly the documented types (D11): GIF, BMP, PDF, text, an empty-ish file: 415; a
        pixel bomb over the cap: 413. The refused uploads answer 410 afterwards."""
        sc = "types"
        a = self.t["A"]
        pid = a.ids["project_id"]
        for what, data in (
            ("gif", _pil("GIF")),
            ("bmp", _pil("BMP")),
            ("ico", _pil("ICO")),
            ("pdf", b"%PDF-1.4\n" + b"0" * 200),
            ("text", b"hello, world " * 20),
            ("zeros", b"\0" * 100),
            ("jpeg-magic-only", b"\xff\xd8\xff" + b"\0" * 60),
        ):
            u = self.upload_expect(sc, a, pid, data, expect={415, 422, 204})
            if u and what not in ("jpeg-magic-only",):
                self.call(sc, "HEAD", "/v1/uploads/{upload_id}", headers=a.auth() | TUS, expect={410}, upload_id=u)
        for w, h in ((11_000, 10_000), (12_000, 10_000), (40_000, 40_000)):  # 110 MP (over the 100 MP cap) and up
            u = self.upload_expect(sc, a, pid, png_bomb(w, h), expect={413})
            if u:
                self.call(sc, "HEAD", "/v1/uploads/{upload_id}", headers=a.auth() | TUS, expect={410}, upload_id=u)

    def upload_expect(self, sc: str, t: Tenant, pid: str, data: bytes, *, expect: Any) -> str | None:
        h = t.auth("upload") | TUS | {"Upload-Length": str(len(data))}
        r = self.call(sc, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={201}, project_id=pid)
        if not isinstance(r, httpx.Response) or r.status_code != 201:
            return None
        u = r.headers["Location"].rsplit("/", 1)[1]
        h = t.auth("upload") | TUS | OCTETS | {"Upload-Offset": "0"}
        self.call(sc, "PATCH", "/v1/uploads/{upload_id}", headers=h, content=data, expect=expect, upload_id=u)
        return u

    def hostile_bodies(self) -> None:
        """NaN, Infinity, 1e400, zero, negative and huge numbers, unknown fields at every depth,
        lone surrogates in every string of every JSON body; malformed JSON (D2, D6, D7)."""
        sc = "hostile-bodies"
        a = self.t["A"]
        ids = a.ids | {"contract_id": a.contracts["spare"]}
        bodies = {
            ("POST", "/v1/contracts"): {"starts_on": "2026-01-05"},
            ("POST", "/v1/contracts/{contract_id}/terminate"): {"disposition": "destroy"},
            ("POST", "/v1/subjects"): {
                "contract_id": a.contracts["main"],
                "name": "Jan",
                "address": "Dorp 1",
                "phone": "012",
            },
            ("PATCH", "/v1/subjects/{subject_id}"): {"name": NAME, "address": STREET, "phone": "013"},
            ("POST", "/v1/projects"): {
                "contract_id": a.contracts["main"],
                "reference": "P-2",
                "subject_id": ids["subject_id"],
            },
            ("POST", "/v1/projects/{project_id}/designs"): {
                "descriptor": {"name": "gate", "units": "m", "anchor": [0.5, 0.0, 0.0], "scalable": True}
            },
            ("POST", "/v1/projects/{project_id}/jobs"): self.job_body,
            ("POST", "/v1/projects/{project_id}/jobs#site"): self.job_body
            | {"placement": {"site": {"position": [1.5, -2.0, 0.0], "rotation_deg": 30.0}}},
            ("POST", "/v1/projects/{project_id}/jobs#point"): self.job_body
            | {"placement": {"image": ids["photo_id"], "ground_point": [50, 60], "rotation_deg": -15}},
            ("POST", "/v1/jobs/{job_id}/measure"): {
                "segments": [{"image": ids["photo_id"], "a": [10, 20], "b": [90, 25]}]
            },
        }
        limit = 6 if self.quick else None
        for (method, label), body in bodies.items():
            route = label.split("#")[0]
            muts = list(mutations(body))
            if limit is not None:
                muts = self.rng.sample(muts, min(limit, len(muts)))
            for what, bad in muts:
                # A NUL may be refused or stored (sealed); never a 5xx (PostgreSQL's text refuses it).
                self.call(
                    sc,
                    method,
                    route,
                    headers=a.auth(),
                    json_body=bad,
                    expect=not_5xx if what.startswith("NUL") else {400, 404, 409, 413, 422},
                    **_params(route, ids),
                )
            for raw in MALFORMED:
                self.call(
                    sc,
                    method,
                    route,
                    headers=a.auth(),
                    raw=raw,
                    expect={400, 404, 409, 413, 422},
                    **_params(route, ids),
                )
        # A lone surrogate in the design's name as raw JSON text (D7), and in a subject's name.
        raw = '{"descriptor": {"name": "D\\ud800"}}'
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/designs",
            headers=a.auth(),
            raw=raw,
            expect={422},
            project_id=ids["project_id"],
        )
        raw = '{"contract_id": "' + a.contracts["main"] + '", "name": "J\\udfff"}'
        self.call(sc, "POST", "/v1/subjects", headers=a.auth(), raw=raw, expect={422})
        # A body over the JSON cap, declared and streamed.
        huge = '{"name": "' + "x" * (2 * 2**20) + '"}'
        self.call(sc, "POST", "/v1/subjects", headers=a.auth(), raw=huge, expect={413})
        self.call(
            sc,
            "POST",
            "/v1/subjects",
            headers=a.auth() | {"Content-Type": "application/json"},
            content=iter([huge.encode()]),
            expect={413},
        )

    def idempotency(self) -> None:
        """A replay after the upload was deleted: 410 (D10); the same key for another request: 409."""
        sc = "idempotency"
        a = self.t["A"]
        pid = a.ids["project_id"]
        key = f"adv-{self.rng.randrange(10**9)}"
        h = a.auth("upload") | TUS | {"Upload-Length": "5000", "Idempotency-Key": key}
        u = self.create_upload(sc, h, pid)
        self.call(sc, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={201}, project_id=pid, server=1)
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=h | {"Upload-Length": "5001"},
            expect={409, 422},
            project_id=pid,
        )
        self.call(sc, "DELETE", "/v1/uploads/{upload_id}", headers=a.auth("upload") | TUS, expect={204}, upload_id=u)
        for server in (0, 1):
            self.call(
                sc, "POST", "/v1/projects/{project_id}/uploads", headers=h, expect={410}, project_id=pid, server=server
            )
        # The same for a photo deleted after it was anonymised.
        key2 = key + "-b"
        data = PHOTOS[1].read_bytes()
        h2 = a.auth("upload") | TUS | {"Upload-Length": str(len(data)), "Idempotency-Key": key2}
        u2 = self.create_upload(sc, h2, pid)
        self.call(sc, "DELETE", "/v1/photos/{photo_id}", headers=a.auth("upload"), expect={204}, photo_id=u2)
        self.call(sc, "POST", "/v1/projects/{project_id}/uploads", headers=h2, expect={410}, project_id=pid)
        # A created subject replayed: the same id; with another body: 409.
        body = {"contract_id": a.contracts["main"], "name": NAME}
        kh = a.auth() | {"Idempotency-Key": key + "-s"}
        r1 = self.call(sc, "POST", "/v1/subjects", headers=kh, json_body=body, expect={201})
        r2 = self.call(sc, "POST", "/v1/subjects", headers=kh, json_body=body, expect={201}, server=1)
        if isinstance(r1, httpx.Response) and isinstance(r2, httpx.Response) and r1.text != r2.text:
            self.tally.violation(sc, "a replayed subject creation answered differently")
        self.call(sc, "POST", "/v1/subjects", headers=kh, json_body=body | {"name": "Other"}, expect={409, 422})
        if isinstance(r1, httpx.Response) and r1.status_code == 201:
            self.call(
                sc, "DELETE", "/v1/subjects/{subject_id}", headers=a.auth(), expect={204}, subject_id=r1.json()["id"]
            )

    def burst(self) -> None:
        """Writes at once through both servers: 16 threads creating subjects, projects and
        uploads, and 8 sending one Idempotency-Key at the same moment (one project, every answer
        201 with it or 409). The two processes share one database file on SQLite."""
        sc = "burst"
        a = self.t["A"]
        n = 24 if self.quick else 80
        start = threading.Barrier(16)

        def writer(i: int) -> None:
            start.wait(30)
            for k in range(i, n, 16):
                if k % 3 == 0:
                    body = {"contract_id": a.contracts["main"], "name": f"Burst {k}"}
                    self.call(sc, "POST", "/v1/subjects", headers=a.auth(), json_body=body, expect={201}, server=k % 2)
                elif k % 3 == 1:
                    body = {"contract_id": a.contracts["main"], "reference": f"B-{k}"}
                    self.call(sc, "POST", "/v1/projects", headers=a.auth(), json_body=body, expect={201}, server=k % 2)
                else:
                    self.create_upload(
                        sc, a.auth() | TUS | {"Upload-Length": "1000"}, a.ids["project_id"], server=k % 2
                    )

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(180)
        key = f"burst-{self.rng.randrange(10**9)}"
        answers: list[Any] = []
        same = threading.Barrier(8)

        def replayer(i: int) -> None:
            same.wait(30)
            body = {"contract_id": a.contracts["main"], "reference": "one"}
            h = a.auth() | {"Idempotency-Key": key}
            answers.append(
                self.call(sc, "POST", "/v1/projects", headers=h, json_body=body, expect={201, 409}, server=i % 2)
            )

        threads = [threading.Thread(target=replayer, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        made = {r.json()["id"] for r in answers if isinstance(r, httpx.Response) and r.status_code == 201}
        if len(made) != 1:
            self.tally.violation(sc, f"one Idempotency-Key sent 8 times at once made {len(made)} projects")

    def restriction(self) -> None:
        """An upload-only token cannot erase or rectify (D12); photos uploaded while their
        subject is restricted are anonymised soon after the lift, without a restart (D5)."""
        sc = "restriction"
        a = self.t["A"]
        ids = self.make_project(sc, a, a.contracts["main"])
        s = ids["subject_id"]
        self.call(sc, "DELETE", "/v1/subjects/{subject_id}", headers=a.auth("upload"), expect={403}, subject_id=s)
        self.call(
            sc,
            "PATCH",
            "/v1/subjects/{subject_id}",
            headers=a.auth("upload"),
            json_body={"name": "X"},
            expect={403},
            subject_id=s,
        )
        self.call(sc, "POST", "/v1/subjects/{subject_id}/restrict", headers=a.auth(), expect={200}, subject_id=s)
        self.call(
            sc,
            "POST",
            "/v1/subjects/{subject_id}/restrict",
            headers=a.auth(),
            expect={200, 409},
            subject_id=s,
            server=1,
        )
        u = self.upload(sc, a, ids["project_id"], PHOTOS[2].read_bytes())
        time.sleep(1.5)
        st = self.photo_state(sc, a, u or "")
        if st.get("state") != "quarantined":
            self.tally.violation(sc, f"a restricted subject's photo is {st.get('state')}, not quarantined")
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/jobs",
            headers=a.auth(),
            json_body=self.job_body,
            expect={404, 409, 422},
            project_id=ids["project_id"],
        )
        self.call(
            sc, "POST", "/v1/subjects/{subject_id}/lift-restriction", headers=a.auth(), expect={200}, subject_id=s
        )
        if u:
            got = self.wait_anonymised(sc, a, [u], limit=30.0)
            if got.get(u, {}).get("state") != "anonymised":
                self.tally.violation(sc, "a photo stayed quarantined after its subject's restriction was lifted")
        self.call(sc, "DELETE", "/v1/subjects/{subject_id}", headers=a.auth(), expect={204}, subject_id=s)
        self.call(sc, "DELETE", "/v1/subjects/{subject_id}", headers=a.auth(), expect={404}, subject_id=s, server=1)
        self.call(sc, "GET", "/v1/photos/{photo_id}", headers=a.auth(), expect={404}, photo_id=u or "0" * 32)

    def double_termination(self) -> None:
        """Two terminations of one contract at once, through both servers, then the API and the
        CLI at once (D3): no 5xx, the steps run once, one archive and one certificate."""
        sc = "double-termination"
        a = self.t["A"]
        for role, with_cli in (("double", False), *(() if self.quick else (("cli_race", True),))):
            cid = a.contracts[role]
            ids = self.make_project(sc, a, cid)
            u = self.upload(sc, a, ids["project_id"], PHOTOS[3].read_bytes())
            self.wait_anonymised(sc, a, [u] if u else [])
            answers: list[Any] = []

            def end(server: int, cid: str = cid, answers: list[Any] = answers) -> None:
                answers.append(
                    self.call(
                        sc,
                        "POST",
                        "/v1/contracts/{contract_id}/terminate",
                        headers=a.auth(),
                        json_body={"disposition": "return"},
                        expect={200, 409},
                        server=server,
                        contract_id=cid,
                    )
                )

            threads = [threading.Thread(target=end, args=(i,)) for i in ((0,) if with_cli else (0, 1))]
            cli = None
            if with_cli:
                cli = subprocess.Popen(
                    [str(SITEPLAN), "contract", "end", cid, "--disposition", "return"],
                    env=self.env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                time.sleep(1.0)  # the CLI's start-up; it may still lose the race
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
            if cli is not None:
                _, err = cli.communicate(timeout=180)
                if cli.returncode not in (0, 1) or b"Traceback" in err:
                    self.tally.violation(sc, f"contract end exited {cli.returncode}: {err.decode()[-300:]}")
            self.wait_for(sc, lambda cid=cid: self.contract_state(cid) == "ended", 120)
            self.check_one_outcome(sc, cid)
            self.hand_over(sc, a, cid)

    def contract_state(self, cid: str) -> str | None:
        a = self.t["A"]
        r = self.call("poll", "GET", "/v1/contracts/{contract_id}", headers=a.auth(), contract_id=cid)
        return r.json().get("state") if isinstance(r, httpx.Response) and r.status_code == 200 else None

    def check_one_outcome(self, sc: str, cid: str) -> None:
        exports = self.data / "exports"
        archives = [p.name for p in exports.iterdir() if cid in p.name] if exports.exists() else []
        if archives != [f"{cid}-export.zip"]:
            self.tally.violation(sc, f"archives for one contract: {archives}")
        certs = [p.name for p in (self.data / "certificates").glob(f"*{cid}*.json")]
        if len(certs) != 1:
            self.tally.violation(sc, f"certificates for one contract: {certs}")
        a = self.t["A"]
        r = self.call(
            sc, "GET", "/v1/contracts/{contract_id}/certificate", headers=a.auth(), expect={200}, contract_id=cid
        )
        if isinstance(r, httpx.Response) and r.status_code == 200 and archives:
            doc = r.json().get("document", r.json())
            sha = hashlib.sha256((exports / archives[0]).read_bytes()).hexdigest()
            if json.dumps(doc).find(sha) < 0:
                self.tally.violation(sc, "the certificate does not describe the archive on disk")

    def hand_over(self, sc: str, t: Tenant, cid: str) -> None:
        """The controller downloads the returned archive and confirms receipt: the service's copy
        is shredded (else it would be, rightly, plaintext on disk at the end)."""
        self.call(sc, "GET", "/v1/contracts/{contract_id}/export", headers=t.auth(), expect={200}, contract_id=cid)
        self.call(
            sc,
            "DELETE",
            "/v1/contracts/{contract_id}/export",
            headers=t.auth(),
            expect={204},
            contract_id=cid,
            server=1,
        )
        self.call(
            sc,
            "DELETE",
            "/v1/contracts/{contract_id}/export",
            headers=t.auth(),
            expect={404, 409, 410},
            contract_id=cid,
        )
        self.call(
            sc,
            "POST",
            "/v1/projects",
            headers=t.auth(),
            json_body={"contract_id": cid, "reference": "x"},
            expect={409, 422},
        )

    def races(self) -> None:
        """An erasure (several times) and a termination racing a streaming PATCH on the other
        server (D4): the PATCH answers 204 whole, 404 or 410; the upload is gone; nothing made
        again on disk."""
        sc = "race-patch"
        a = self.t["A"]
        rounds = 2 if self.quick else 6
        for i in range(rounds + 1):
            ending = "terminate" if i == rounds else "erase"
            cid = a.contracts["race_term"] if ending == "terminate" else a.contracts["main"]
            ids = self.make_project(sc, a, cid)
            data = PHOTOS[4].read_bytes() * 6
            u = self.create_upload(sc, a.auth("upload") | TUS | {"Upload-Length": str(len(data))}, ids["project_id"])
            go = threading.Event()
            at = self.rng.uniform(0.1, 0.8)

            def body(data: bytes = data, at: float = at, go: threading.Event = go) -> Iterator[bytes]:
                step = 64 * 1024
                for k in range(0, len(data), step):
                    if k >= len(data) * at:
                        go.set()
                        time.sleep(0.05)
                    yield data[k : k + step]
                go.set()

            out: list[Any] = []

            def patch(u: str = u, body: Callable[[], Iterator[bytes]] = body, out: list[Any] = out) -> None:
                out.append(
                    self.call(
                        sc,
                        "PATCH",
                        "/v1/uploads/{upload_id}",
                        headers=a.auth("upload") | TUS | OCTETS | {"Upload-Offset": "0"},
                        content=body(),
                        expect=lambda x: isinstance(x, Exception) or x.status_code in (204, 404, 409, 410),
                        server=0,
                        upload_id=u,
                    )
                )

            th = threading.Thread(target=patch)
            th.start()
            go.wait(60)
            if ending == "erase":
                self.call(
                    sc,
                    "DELETE",
                    "/v1/subjects/{subject_id}",
                    headers=a.auth(),
                    expect={204, 409},
                    server=1,
                    subject_id=ids["subject_id"],
                )
            else:
                self.call(
                    sc,
                    "POST",
                    "/v1/contracts/{contract_id}/terminate",
                    headers=a.auth(),
                    json_body={"disposition": "destroy"},
                    expect={200, 409},
                    server=1,
                    contract_id=cid,
                )
            th.join(120)
            (res,) = out
            if (
                isinstance(res, httpx.Response)
                and res.status_code == 204
                and res.headers.get("Upload-Offset") != str(len(data))
            ):
                self.tally.violation(
                    sc, f"204 with offset {res.headers.get('Upload-Offset')} for an upload that is gone"
                )
            self.call(sc, "HEAD", "/v1/uploads/{upload_id}", headers=a.auth() | TUS, expect={404, 410}, upload_id=u)
            self.call(
                sc,
                "PATCH",
                "/v1/uploads/{upload_id}",
                headers=a.auth() | TUS | OCTETS | {"Upload-Offset": "0"},
                content=b"x",
                expect={404, 409, 410},
                upload_id=u,
            )
            staged = self.data / "uploads" / cid / u
            if staged.exists():
                self.tally.violation(
                    sc, f"{ending}: the upload's staging was made again ({sorted(p.name for p in staged.iterdir())})"
                )
        # A second termination of the ended contract: the first answer again, never the steps.
        cid = a.contracts["race_term"]
        self.call(
            sc,
            "POST",
            "/v1/contracts/{contract_id}/terminate",
            headers=a.auth(),
            json_body={"disposition": "destroy"},
            expect={200},
            contract_id=cid,
        )
        self.call(
            sc,
            "POST",
            "/v1/contracts/{contract_id}/terminate",
            headers=a.auth(),
            json_body={"disposition": "return"},
            expect={409},
            contract_id=cid,
        )

    def kill_server_mid_upload(self) -> None:
        """kill -9 of server 0 while it receives an upload (and anonymises the ones before);
        restarted, the upload resumes from HEAD's offset to the same anonymised photo."""
        sc = "kill9-server"
        a = self.t["A"]
        pid = a.ids["project_id"]
        for _ in range(1 if self.quick else 3):
            quick = [self.upload(sc, a, pid, p.read_bytes()) for p in PHOTOS[5:7]]
            data = PHOTOS[0].read_bytes()
            u = self.create_upload(sc, a.auth("upload") | TUS | {"Upload-Length": str(len(data))}, pid, server=0)
            cut = self.rng.randrange(len(data) // 10, len(data) - 1)

            def body(data: bytes = data, cut: int = cut) -> Iterator[bytes]:
                yield data[:cut]
                time.sleep(30)  # killed meanwhile
                yield data[cut:]

            th = threading.Thread(
                target=self.call,
                args=(sc, "PATCH", "/v1/uploads/{upload_id}"),
                kwargs={
                    "headers": a.auth("upload") | TUS | OCTETS | {"Upload-Offset": "0"},
                    "content": body(),
                    "server": 0,
                    "expect": {"transport"},
                    "upload_id": u,
                },
                daemon=True,
            )
            th.start()
            time.sleep(1.0)
            self.servers[0].kill9()
            th.join(60)
            self.servers[0].start()
            r = self.call(sc, "HEAD", "/v1/uploads/{upload_id}", headers=a.auth() | TUS, expect={200}, upload_id=u)
            off = int(r.headers.get("Upload-Offset", "0")) if isinstance(r, httpx.Response) else 0  # type: ignore[union-attr]
            self.call(
                sc,
                "PATCH",
                "/v1/uploads/{upload_id}",
                headers=a.auth("upload") | TUS | OCTETS | {"Upload-Offset": str(off)},
                content=data[off:],
                expect={204},
                upload_id=u,
            )
            states = self.wait_anonymised(sc, a, [u, *[q for q in quick if q]], limit=120)
            if self.photo_sha and states.get(u, {}).get("sha256") != self.photo_sha[PHOTOS[0].name]:
                self.tally.violation(sc, "the upload resumed after kill -9 gives another anonymised photo")

    def kill_cli_mid_termination(self) -> None:
        """kill -9 of `siteplan contract end` once a chosen step is done (or at once), the API
        asked meanwhile, then the CLI run again: one archive, one certificate, counts that match."""
        sc = "kill9-cli"
        a = self.t["A"]
        cid = a.contracts["cli_kill"]
        ids = self.make_project(sc, a, cid)
        photos = [self.upload(sc, a, ids["project_id"], p.read_bytes()) for p in PHOTOS[7:9]]
        self.wait_anonymised(sc, a, [p for p in photos if p])
        r = self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=a.auth() | TUS | {"Upload-Length": "400000"},
            expect={201},
            project_id=ids["project_id"],
        )
        steps = ["freeze", "export", "inventory", "rows"]
        stop_after = self.rng.choice(steps)
        cli = subprocess.Popen(
            [str(SITEPLAN), "contract", "end", cid, "--disposition", "return"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

        def reached() -> bool:
            done = self.termination_steps(cid)
            return stop_after in done or cli.poll() is not None

        self.wait_for(sc, reached, 120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)
        cli.wait(30)
        # Mid-termination, the API refuses new work and answers reads.
        for method, route, kw in (
            ("GET", "/v1/contracts/{contract_id}", {}),
            ("POST", "/v1/projects", {"json_body": {"contract_id": cid, "reference": "late"}}),
            ("POST", "/v1/subjects", {"json_body": {"contract_id": cid, "name": "late"}}),
        ):
            self.call(sc, method, route, headers=a.auth(), expect=lambda r: not_5xx(r), contract_id=cid, **kw)
        self.call(
            sc,
            "POST",
            "/v1/projects/{project_id}/uploads",
            headers=a.auth() | TUS | {"Upload-Length": "10"},
            expect={404, 409},
            project_id=ids["project_id"],
        )
        out = subprocess.run(
            [str(SITEPLAN), "contract", "end", cid, "--disposition", "return"],
            env=self.env,
            capture_output=True,
            timeout=300,
        )
        if out.returncode != 0:
            self.tally.violation(
                sc, f"contract end, run again after kill -9 at '{stop_after}': {out.stderr.decode()[-300:]}"
            )
        self.check_one_outcome(sc, cid)
        r = self.call(
            sc, "GET", "/v1/contracts/{contract_id}/certificate", headers=a.auth(), expect={200}, contract_id=cid
        )
        if isinstance(r, httpx.Response) and r.status_code == 200:
            doc = r.json().get("document", {})
            if doc.get("destroyed", {}).get("objects", 0) < 2:
                self.tally.violation(
                    sc, f"the certificate counts {doc.get('destroyed')} objects; two photos were stored"
                )
        self.hand_over(sc, a, cid)

    def termination_steps(self, cid: str) -> list[str]:
        from sqlalchemy import create_engine, text

        eng = create_engine(self.db_url)
        try:
            with eng.connect() as c:
                row = c.execute(text("select termination from contracts where id = :i"), {"i": cid}).first()
        finally:
            eng.dispose()
        if row is None or row[0] is None:
            return []
        term = row[0] if isinstance(row[0], dict) else json.loads(row[0])
        return list(term.get("steps", []))

    def cleanup_and_scan(self) -> list[str]:
        """Erase what is left, end B's contract (destroy), stop the servers, scan."""
        sc = "end"
        a, b = self.t["A"], self.t["B"]
        self.call(
            sc,
            "DELETE",
            "/v1/subjects/{subject_id}",
            headers=a.auth(),
            expect={204, 404},
            subject_id=a.ids["subject_id"],
        )
        for cid in a.contracts["main"], a.contracts["spare"], b.contracts["main"], b.contracts["spare"]:
            t = a if cid in a.contracts.values() else b
            self.call(
                sc,
                "POST",
                "/v1/contracts/{contract_id}/terminate",
                headers=t.auth(),
                json_body={"disposition": "destroy"},
                expect={200},
                contract_id=cid,
            )
        for s in self.servers:
            s.stop()
        for what in left_behind(self.data):
            self.tally.violation(sc, what)
        return scan(self.data, [s.log for s in self.servers])

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self.t = seed(self.data, self.db_url)
        for s in self.servers:
            s.start()
        sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampling = True
        sampler.start()
        phases: dict[str, float] = {}
        try:
            for phase in (
                self.build_world,
                self.isolation,
                self.scopes,
                *(() if self.quick else (self.isolation, self.scopes)),  # again: each route on the other server
                self.tus,
                self.odd_headers,
                self.file_types,
                self.hostile_bodies,
                self.idempotency,
                self.burst,
                self.restriction,
                self.races,
                self.double_termination,
                *(() if self.quick else (self.kill_server_mid_upload, self.kill_cli_mid_termination)),
            ):
                p0 = time.monotonic()
                try:
                    phase()
                except Exception as exc:  # a phase that breaks is a finding, the rest still runs
                    self.tally.violation(phase.__name__, f"the scenario broke: {type(exc).__name__}: {exc}"[:400])
                phases[phase.__name__] = round(phases.get(phase.__name__, 0.0) + time.monotonic() - p0, 1)
            plaintext = self.cleanup_and_scan()
        finally:
            self._sampling = False
            for s in self.servers:
                s.stop()
            self.http.close()
        return {
            "requests": self.tally.requests,
            "statuses": dict(sorted(self.tally.statuses.items())),
            "five_xx": self.tally.errors,
            "violations": self.tally.violations,
            "plaintext": plaintext,
            "by_scenario": {k: dict(sorted(v.items())) for k, v in self.tally.by_scenario.items()},
            "duration_s": round(time.monotonic() - t0, 1),
            "phases_s": phases,
            "peak_rss_mb": {s.name: round(s.peak_rss / 2**20) for s in self.servers},
            "server_starts": sum(s.starts for s in self.servers),
            "database": self.db_url.split(":")[0],
        }

    def _sample(self) -> None:
        while self._sampling:
            for s in self.servers:
                s.sample_rss()
            time.sleep(0.5)


def not_5xx(r: httpx.Response | Exception) -> bool:
    """an answer, not a 5xx"""
    return isinstance(r, httpx.Response) and r.status_code < 500


# -- Bodies --------------------------------------------------------------------------------------

BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/contracts/{contract_id}/terminate"): {"disposition": "destroy"},
    ("PATCH", "/v1/subjects/{subject_id}"): {"name": "X"},
    ("POST", "/v1/projects/{project_id}/designs"): {"descriptor": {"units": "mm"}},
    ("POST", "/v1/subjects"): {"contract_id": "@contract", "name": "X"},
    ("POST", "/v1/projects"): {"contract_id": "@contract", "reference": "X"},
    ("POST", "/v1/projects/{project_id}/jobs"): {
        "design_id": "0" * 32,
        "reference": {"segments": []},
        "placement": {"site": {"position": [0, 0]}},
    },
    ("POST", "/v1/jobs/{job_id}/measure"): {"segments": [{"image": "0" * 32, "a": [1, 1], "b": [90, 1]}]},
}

MALFORMED = [
    "",
    "{",
    "[]",
    "null",
    '"x"',
    "NaN",
    "{}" * 3,
    "[" * 50_000 + "]" * 50_000,
    '{"a": ' + "9" * 5000 + "}",
    '{"name": "\\ud800\\u0000"}',
    "\xff\xfe{}",
]


BAD_NUMBERS: list[Any] = [*NOT_FINITE_OR_HUGE, 0, -1, 10**30]


def mutations(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Each an input that cannot work: unknown fields, lone surrogates, bad numbers, wrong types.
    Zero and negative numbers are not always wrong (an anchor may be 0, a rotation negative), so
    zero goes only where a length must be positive, and -1 there and in a pixel coordinate."""
    for path, v in leaves(body):
        where = ".".join(map(str, path)) or "body"
        if isinstance(v, dict):
            yield f"unknown field in {where}", replaced(body, path, {**v, "note": MARKER})
        elif isinstance(v, str):
            yield f"lone surrogate in {where}", replaced(body, path, v[:1] + "\ud800" + v[1:])
            yield f"NUL in {where}", replaced(body, path, v[:1] + "\u0000" + v[1:])  # PostgreSQL text refuses it
            yield f"object for a string in {where}", replaced(body, path, {"$ne": None})
        elif isinstance(v, bool):
            yield f"string for a bool in {where}", replaced(body, path, "maybe")
        elif isinstance(v, int | float):
            positive = bool(path) and path[-1] in ("length_m", "size_m")
            pixel = any(k in ("a", "b", "ground_points", "ground_point") for k in path)  # inside the photo
            for bad in BAD_NUMBERS:
                if (bad == 0 and not positive) or (bad == -1 and not (positive or pixel)):
                    continue
                yield f"{bad} in {where}", replaced(body, path, bad)
        elif isinstance(v, list):
            yield f"empty list in {where}", replaced(body, path, [])


def _params(route: str, ids: dict[str, str]) -> dict[str, str]:
    return {k: ids.get(k, "0" * 32) for k in re.findall(r"{(\w+)}", route)}


def _b64(s: str) -> str:
    import base64

    return base64.b64encode(s.encode()).decode()


def _pil(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def png_bomb(w: int, h: int) -> bytes:
    """A PNG that announces w x h pixels in its header (a few rows of zeros follow)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * ((w + 1) * 64), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# -- The disk, afterwards ------------------------------------------------------------------------

MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"glTF": "glTF",
    b"PK\x03\x04": "zip",
    b"GIF8": "GIF",
    b"BM": "BMP",
}


def scan(data: Path, logs: list[Path]) -> list[str]:
    """Plaintext left under the data folder: a photo, model or archive in clear (by its magic),
    a name, street or design name the run typed (UTF-8 or UTF-16), an SQLite database other than
    the service's own; and any of those names in the servers' logs."""
    needles = [s.encode() for s in SECRETS] + [s.encode("utf-16-le") for s in SECRETS]
    found = []
    service_db = {data / n for n in ("siteplan.db", "siteplan.db-wal", "siteplan.db-shm", "siteplan.db-journal")}
    for p in sorted(data.rglob("*")):
        if not p.is_file() or p.is_symlink():
            continue
        try:
            blob = p.read_bytes()
        except OSError:
            continue
        rel = str(p.relative_to(data))
        for magic, what in MAGIC.items():
            if blob.startswith(magic) and not (what == "BMP" and len(blob) < 64):
                found.append(f"{rel}: a {what} file in clear")
        if blob.startswith(b"SQLite format 3") and p not in service_db:
            found.append(f"{rel}: an SQLite database")
        for n in needles:
            if n in blob:
                found.append(f"{rel}: holds {n[:12]!r}")
    for log in logs:
        text = log.read_bytes() if log.exists() else b""
        found += [f"{log.name}: holds {n[:12]!r}" for n in needles if n in text]
    return found


def left_behind(data: Path) -> list[str]:
    """Once every contract with data has ended or been erased: no vault object, no upload's
    staging (a lock file at most, for the hourly sweep) and no scratch may be left."""
    found = []
    for sub in ("vault/objects", "uploads", "scratch"):
        root = data / sub
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.is_file() and not (sub == "uploads" and p.name.endswith(".lock")):
                found.append(f"left behind: {p.relative_to(data)}")
    return found


# -- Entry point ---------------------------------------------------------------------------------


def run(work: Path, *, quick: bool = False, seed_: int = 24, db_url: str | None = None) -> dict[str, Any]:
    return Run(work, quick=quick, seed_=seed_, db_url=db_url).run()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="the bounded version the test suite runs: fewer repetitions, no kill -9 (tests/api/test_kill9.py), "
        "no CLI termination",
    )
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    ap.add_argument("--database-url", help="a PostgreSQL URL to share instead of SQLite (an empty database)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=False)
            work = args.keep
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="siteplan-adv-")))
        report = run(work, quick=args.quick, seed_=args.seed, db_url=args.database_url)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if not report["five_xx"] and not report["violations"] and not report["plaintext"] else 1


if __name__ == "__main__":
    sys.exit(main())
