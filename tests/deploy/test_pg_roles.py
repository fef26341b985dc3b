"""The PostgreSQL rights docs/operations.md asks for are enough, and needed: a login role that
owns its database and is nothing else (no superuser, no CREATEDB, no CREATEROLE) migrates from
scratch, runs revision 0004 (which seals clear text and rewrites the tables with VACUUM FULL, a
right of the tables' owner), and backs up and restores; a role with only row rights cannot
migrate, and says so."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from dataprotection.backup import backup, restore
from dataprotection.vault import FileKeyStore, Vault
from siteplan.db import init_db, migrate
from tests.api.test_sealed_fields import REFERENCE, _at_0003, _insert_clear_rows, _raw_rows
from tests.pg import PG_ADMIN_URL


@pytest.fixture
def owner_url(pg_url: str) -> Iterator[str]:
    """The database of pg_url, owned by a fresh role with LOGIN only (what the docs' SQL creates)."""
    role = f"sp_role_{uuid.uuid4().hex[:8]}"
    db = pg_url.rsplit("/", 1)[1]
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
        c.exec_driver_sql(f'ALTER DATABASE "{db}" OWNER TO "{role}"')
        c.exec_driver_sql(f'REVOKE ALL ON DATABASE "{db}" FROM PUBLIC')
    try:
        yield pg_url.replace("//postgres@", f"//{role}@")
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            c.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def test_the_owner_role_migrates_seals_rewrites_backs_up_and_restores(owner_url: str, tmp_path: Path) -> None:
    engine = _at_0003(owner_url)
    with engine.connect() as c:
        assert not c.exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar()
    keys = FileKeyStore(tmp_path / "keys")
    keys.create("c1")
    _insert_clear_rows(engine, "c1", "c2")
    migrate(engine, keys)  # 0004 seals, then VACUUM FULL projects, designs, idempotency
    assert REFERENCE not in _raw_rows(engine)
    engine.dispose()
    vault = Vault(tmp_path / "vault", keys)
    archive = tmp_path / "b.tar.gz"
    meta = backup(db_file=tmp_path / "none.db", vault_root=vault.root, out=archive, db_url=owner_url)
    assert meta["database"] == "postgresql"
    rep = restore(
        archive,
        db_file=tmp_path / "none.db",
        vault_root=vault.root,
        factory_for=lambda: init_db(owner_url, keys),
        vault=vault,
        force=True,
        db_url=owner_url,
    )
    assert rep.contracts == 2 and rep.unrecoverable == []
    with sa.create_engine(owner_url).connect() as c:
        assert c.exec_driver_sql("SELECT count(*) FROM projects").scalar() == 2


def test_a_role_with_row_rights_only_cannot_migrate(owner_url: str, pg_url: str) -> None:
    role = f"sp_rw_{uuid.uuid4().hex[:8]}"
    owner = sa.create_engine(owner_url)
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
    try:
        _at_0003(owner_url).dispose()
        with owner.begin() as c:
            c.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{pg_url.rsplit("/", 1)[1]}" TO "{role}"')
            c.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
        rw = sa.create_engine(pg_url.replace("//postgres@", f"//{role}@"))
        with pytest.raises(sa.exc.ProgrammingError, match=r"must be owner|permission denied"):
            migrate(rw)
        rw.dispose()
    finally:
        owner.dispose()
        su = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with su.connect() as c:
            c.exec_driver_sql(f'DROP OWNED BY "{role}"')  # its grants, on the tables and the database
        su.dispose()
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP ROLE "{role}"')
        admin.dispose()
