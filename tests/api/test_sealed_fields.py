"""A project's reference and a design's name are sealed with the contract's key (dataprotection/fields.py),
and revision 0004 seals the ones an earlier version stored in clear, on both databases."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from api.app import create_app
from dataprotection.fields import design_descriptor, open_reference
from dataprotection.vault import FileKeyStore
from siteplan.db import Design, IdempotencyRecord, Project, alembic_config, downgrade, make_engine, migrate
from tests.api.conftest import Api, make_settings

REFERENCE = "Carport Verbruggen, Kerkstraat 12"
NAME = "Poort voor An Verbruggen"


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def _raw_rows(engine: sa.Engine) -> str:
    """Every project, design and replay row as the database returns it, as one string."""
    with engine.connect() as conn:
        rows = [conn.execute(sa.text(f"SELECT * FROM {t}")).all() for t in ("projects", "designs", "idempotency")]
    return json.dumps([[list(map(str, r)) for r in t] for t in rows])


def test_api_stores_no_clear_text_and_replays_from_the_row(api: Api) -> None:
    t = api.tenant()
    h = t.auth | {"Idempotency-Key": "k-project"}
    r = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": REFERENCE}, headers=h)
    assert r.status_code == 201 and r.json()["reference"] == REFERENCE
    pid = r.json()["id"]
    body = {"descriptor": {"name": NAME, "units": "mm", "scalable": True}}
    hd = t.auth | {"Idempotency-Key": "k-design"}
    d = api.client.post(f"/v1/projects/{pid}/designs", json=body, headers=hd)
    assert d.status_code == 201 and d.json()["descriptor"]["name"] == NAME
    assert d.json()["descriptor"]["units"] == "mm" and d.json()["descriptor"]["scalable"] is True
    did = d.json()["id"]

    # What a reader sees: the text as sent, on every read path, and on a replay.
    assert api.client.get(f"/v1/projects/{pid}", headers=t.auth).json()["reference"] == REFERENCE
    assert api.client.get("/v1/projects", headers=t.auth).json()["items"][0]["reference"] == REFERENCE
    assert api.client.get(f"/v1/designs/{did}", headers=t.auth).json()["descriptor"]["name"] == NAME
    listed = api.client.get(f"/v1/projects/{pid}/designs", headers=t.auth).json()["items"]
    assert listed[0]["descriptor"] == d.json()["descriptor"]
    again = api.client.post("/v1/projects", json={"contract_id": t.contract_id, "reference": REFERENCE}, headers=h)
    assert again.status_code == 201 and again.json() == r.json()
    assert api.client.post(f"/v1/projects/{pid}/designs", json=body, headers=hd).json() == d.json()

    # What the database holds: neither text, in any column of these rows or of the replay records.
    engine = api.svc.factory.kw["bind"]
    raw = _raw_rows(engine)
    assert REFERENCE not in raw and "Verbruggen" not in raw
    with api.scoped(t.id) as db:
        replays = db.scalars(sa.select(IdempotencyRecord)).all()
        assert sorted(rec.body["id"] for rec in replays) == sorted([pid, did])
        assert all(set(rec.body) == {"id"} for rec in replays)
        # Sealed to its row: another row's ciphertext does not open here.
        p = db.get(Project, pid)
        assert p is not None
        other = Project(id="x" * 32, contract_id=p.contract_id, tenant_id=p.tenant_id, reference_enc=p.reference_enc)
        with pytest.raises(Exception, match="failed authentication"):
            open_reference(api.svc.vault.keys, other)


def _insert_clear_rows(engine: sa.Engine, contract: str, gone: str) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tenants (id, label, created_at) VALUES ('t1', 'T', :now)"), {"now": now})
        for cid, state in ((contract, "active"), (gone, "ended")):
            conn.execute(
                sa.text(
                    "INSERT INTO contracts (id, tenant_id, starts_on, state, created_at)"
                    " VALUES (:id, 't1', :d, :state, :now)"
                ),
                {"id": cid, "d": date.today(), "state": state, "now": now},
            )
        for pid, cid in (("p1", contract), ("p2", gone)):
            conn.execute(
                sa.text(
                    "INSERT INTO projects (id, tenant_id, contract_id, reference, created_at)"
                    " VALUES (:id, 't1', :c, :ref, :now)"
                ),
                {"id": pid, "c": cid, "ref": f"{REFERENCE} {pid}", "now": now},
            )
        designs = sa.table(
            "designs",
            sa.column("id"),
            sa.column("tenant_id"),
            sa.column("project_id"),
            sa.column("contract_id"),
            sa.column("descriptor", sa.JSON),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        conn.execute(
            designs.insert(),
            [
                {"id": "d1", "tenant_id": "t1", "project_id": "p1", "contract_id": contract,
                 "descriptor": {"name": NAME, "units": "cm"}, "created_at": now},
                {"id": "d2", "tenant_id": "t1", "project_id": "p1", "contract_id": contract,
                 "descriptor": {"units": "m"}, "created_at": now},
            ],
        )  # fmt: skip
        replays = sa.table(
            "idempotency",
            sa.column("tenant_id"),
            sa.column("key"),
            sa.column("fingerprint"),
            sa.column("status"),
            sa.column("body", sa.JSON),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        conn.execute(
            replays.insert(),
            [
                {"tenant_id": "t1", "key": "a", "fingerprint": "f", "status": 201,
                 "body": {"id": "p1", "reference": f"{REFERENCE} p1"}, "created_at": now},
                {"tenant_id": "t1", "key": "b", "fingerprint": "f", "status": 201,
                 "body": {"id": "d1", "descriptor": {"name": NAME}}, "created_at": now},
                {"tenant_id": "t1", "key": "c", "fingerprint": "f", "status": 201, "body": {"photo_id": "x"},
                 "created_at": now},
            ],
        )  # fmt: skip


def _on_disk(engine: sa.Engine) -> bytes:
    """The bytes the database keeps on disk for the projects, designs and replay tables."""
    if engine.dialect.name == "sqlite":
        path = Path(str(engine.url.database))
        return b"".join(f.read_bytes() for f in (path, Path(f"{path}-wal"), Path(f"{path}-journal")) if f.exists())
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("CHECKPOINT")  # the pages, written to the table files
        return b"".join(
            conn.execute(sa.text("SELECT pg_read_binary_file(pg_relation_filepath(:t))"), {"t": t}).scalar_one()
            for t in ("projects", "designs", "idempotency")
        )


def _at_0003(db_url: str) -> sa.Engine:
    """A database at revision 0003, the last that stored references and names in clear."""
    engine = make_engine(db_url)
    cfg = alembic_config(db_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    return engine


def test_upgrade_seals_what_an_earlier_version_stored_in_clear(tmp_path: Path, db_url: str) -> None:
    engine = _at_0003(db_url)
    keys = FileKeyStore(tmp_path / "keys")
    keys.create("c1")  # "c2"'s key was destroyed: its rows hold nothing readable any more
    _insert_clear_rows(engine, "c1", "c2")
    assert REFERENCE in _raw_rows(engine)

    # Without the key store, or with the wrong one (a key folder not mounted: a running
    # contract without its key), a database with rows to seal is refused, and left as it was.
    with pytest.raises(RuntimeError, match="key store"):
        migrate(engine)
    with pytest.raises(RuntimeError, match="still running have no key"):
        migrate(engine, FileKeyStore(tmp_path / "empty-keys"))
    assert "reference" in _columns(engine, "projects") and "reference_enc" not in _columns(engine, "projects")
    assert "name_enc" not in _columns(engine, "designs") and REFERENCE in _raw_rows(engine)
    assert b"Verbruggen" in _on_disk(engine)

    migrate(engine, keys)
    assert "reference" not in _columns(engine, "projects")
    raw = _raw_rows(engine)
    assert REFERENCE not in raw and "Verbruggen" not in raw
    # Nor in the database's files: SQLite's free pages and log, PostgreSQL's old row versions
    # and the dropped column (which only hides its values).
    assert b"Verbruggen" not in _on_disk(engine)
    with sa.orm.Session(engine) as db:
        p1, p2 = db.get(Project, "p1"), db.get(Project, "p2")
        assert p1 is not None and p2 is not None
        assert open_reference(keys, p1) == f"{REFERENCE} p1" and p2.reference_enc == ""
        d1, d2 = db.get(Design, "d1"), db.get(Design, "d2")
        assert d1 is not None and d2 is not None
        assert design_descriptor(keys, d1) == {"name": NAME, "units": "cm"} and d1.descriptor == {"units": "cm"}
        assert design_descriptor(keys, d2) == {"units": "m"} and d2.name_enc is None
        bodies = sorted(json.dumps(r.body, sort_keys=True) for r in db.scalars(sa.select(IdempotencyRecord)))
        assert bodies == ['{"id": "d1"}', '{"id": "p1"}', '{"photo_id": "x"}']
    migrate(engine, keys)  # at head: nothing more happens

    # And back: the downgrade opens them again (an operator rolling back a release).
    downgrade(engine, "0003", keys)
    with engine.connect() as conn:
        refs = dict(conn.execute(sa.text("SELECT id, reference FROM projects")).all())
    assert refs == {"p1": f"{REFERENCE} p1", "p2": ""}
    engine.dispose()


def test_the_server_upgrades_with_its_key_store(tmp_path: Path) -> None:
    """`siteplan serve` (create_app) hands its key store to the migration."""
    db_url = f"sqlite:///{tmp_path / 'siteplan.db'}"
    settings = make_settings(tmp_path, db_url)
    engine = _at_0003(db_url)
    FileKeyStore(settings.key_dir).create("c1")
    _insert_clear_rows(engine, "c1", "c2")
    engine.dispose()
    app = create_app(settings, background=False)
    with TestClient(app), app.state.services.factory() as db:
        p1 = db.get(Project, "p1")
        assert p1 is not None and open_reference(app.state.services.vault.keys, p1) == f"{REFERENCE} p1"


def test_a_failed_sqlite_upgrade_changes_nothing(tmp_path: Path) -> None:
    """SQLite's driver commits DDL as it goes; the upgrade runs in one explicit transaction, so a
    failure late in it (here the final foreign-key check) leaves revision 0003 whole and retryable."""
    db_url = f"sqlite:///{tmp_path / 'siteplan.db'}"
    engine = _at_0003(db_url)
    keys = FileKeyStore(tmp_path / "keys")
    keys.create("c1")
    _insert_clear_rows(engine, "c1", "c2")
    with engine.connect() as conn:  # a dangling reference the final check finds
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("UPDATE designs SET project_id = 'nowhere' WHERE id = 'd2'")
        conn.commit()
    with pytest.raises(RuntimeError, match="foreign key"):
        migrate(engine, keys)
    assert "reference_enc" not in _columns(engine, "projects") and "name_enc" not in _columns(engine, "designs")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one() == "0003"
        conn.exec_driver_sql("UPDATE designs SET project_id = 'p1' WHERE id = 'd2'")
        conn.commit()
    migrate(engine, keys)  # once the data is right, the same upgrade goes through
    assert "reference_enc" in _columns(engine, "projects")
    engine.dispose()
