"""The register's journal (dataprotection/register.py) holds exactly the committed entries, on both
databases, and a restored database gets back the entries after its own head, up to any gap."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa

from dataprotection import register
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore
from siteplan.db import RegisterEntry, init_db


def _entry(db: sa.orm.Session, tenant_id: str, action: str) -> None:
    register.record(db, tenant_id=tenant_id, actor="operator", action=action, categories=["account"], purpose="test")


def _journal(keys: FileKeyStore) -> list[dict[str, object]]:
    path = register.journal_path(keys)
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_journal_holds_exactly_the_committed_entries_and_restores_them(tmp_path: Path, db_url: str) -> None:
    keys = FileKeyStore(tmp_path / "keys")
    factory = init_db(db_url, keys)
    with factory.begin() as db:
        tid = create_tenant(db, keys, label="T").id
        create_contract(db, keys, tenant_id=tid)  # entry 1: contract_started
    with factory() as db:
        _entry(db, tid, "rolled_back")
        db.rollback()
        _entry(db, tid, "kept_after_rollback")  # the same session, committing afterwards
        db.commit()
    with factory() as db:
        _entry(db, tid, "closed_uncommitted")
        db.close()
        _entry(db, tid, "kept_after_close")  # a closed session can be used again
        db.commit()
    if factory.kw["bind"].dialect.name == "postgresql":  # the app uses no savepoints; SQLite's driver cannot
        with factory() as db:
            _entry(db, tid, "outer_kept")
            with db.begin_nested():
                _entry(db, tid, "savepoint_released")
            sp = db.begin_nested()
            _entry(db, tid, "savepoint_rolled_back")
            sp.rollback()
            db.commit()
        with factory() as db:
            with db.begin_nested():
                _entry(db, tid, "released_then_outer_rolled_back")
            db.rollback()
    with factory() as db:
        stored = register.export_register(db, tid)
    assert _journal(keys) == stored
    actions = [e["action"] for e in stored]
    assert not {"rolled_back", "closed_uncommitted", "savepoint_rolled_back"} & set(actions)
    assert "released_then_outer_rolled_back" not in actions

    # A restored database (its newest entries gone) gets them back, verbatim.
    def cut(n: int) -> None:
        with factory.begin() as db:
            db.execute(sa.delete(RegisterEntry).where(RegisterEntry.tenant_id == tid, RegisterEntry.seq > n))

    cut(1)
    with factory.begin() as db:
        rep = register.replay_journal(db, register.journal_path(keys))
    assert rep == register.JournalReplay(len(stored) - 1, 0)
    with factory() as db:
        assert register.export_register(db, tid) == stored and register.verify_register(db, tid).ok

    # A gap (an entry whose line never reached the journal): the chain stops there, and says so.
    path = register.journal_path(keys)
    assert path is not None
    path.write_text("".join(json.dumps(d) + "\n" for d in stored if d["seq"] != 2) + '{"torn": ')
    cut(1)
    with factory.begin() as db:
        rep = register.replay_journal(db, path)
    assert rep == register.JournalReplay(0, len(stored) - 2)
    with factory() as db:
        assert register.verify_register(db, tid).ok
    factory.kw["bind"].dispose()
