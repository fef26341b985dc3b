"""`siteplan backup` and `restore` on PostgreSQL (the local server, a throwaway database per
test): the same promise as on SQLite (tests/privacy/test_lifecycle.py) - a restore never
resurrects a destroyed contract or an erased subject, and keeps the register's later entries
and the certificates - plus what is PostgreSQL's own: the dump is what pg_restore reads, the
restore is all or nothing, the password never reaches a command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from dataprotection import register
from dataprotection.backup import PG_DUMP_NAME, BackupError, RestoreReport, backup, restore
from dataprotection.lifecycle import terminate_contract
from dataprotection.rights import erase_subject
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore, Vault
from siteplan.db import Certificate, Contract, Photo, Subject, init_db
from siteplan.paths import lifecycle_paths
from siteplan.settings import Settings
from tests.privacy.test_lifecycle import PHOTOS, ContractData, World, _fill, _finish, _scan

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path: Path, pg_url: str) -> World:
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url)
    settings.root.mkdir(parents=True)
    vault = Vault(settings.vault_dir, FileKeyStore(settings.key_dir))
    factory = init_db(settings.db_url, vault.keys)
    with factory.begin() as db:
        t = create_tenant(db, vault.keys, label="Acme Gates")
        c1 = ContractData(create_contract(db, vault.keys, tenant_id=t.id).id, "Jan Janssens")
        c2 = ContractData(create_contract(db, vault.keys, tenant_id=t.id).id, "Marie Peeters")
        for cd in (c1, c2):
            _fill(db, vault, t.id, cd, settings)
        tid = t.id
    for cd in (c1, c2):
        _finish(vault, cd)
    return World(settings, factory, vault, tid, c1, c2)


def _backup(w: World, archive: Path) -> dict[str, object]:
    return backup(
        db_file=w.settings.root / "siteplan.db", vault_root=w.settings.vault_dir, out=archive, db_url=w.settings.db_url
    )


def _restore(w: World, archive: Path, force: bool = True) -> RestoreReport:
    w.factory.kw["bind"].dispose()
    return restore(
        archive,
        db_file=w.settings.root / "siteplan.db",
        vault_root=w.settings.vault_dir,
        factory_for=lambda: init_db(w.settings.db_url, w.vault.keys),
        vault=w.vault,
        force=force,
        certificates_dir=lifecycle_paths(w.settings).certificates,
        db_url=w.settings.db_url,
    )


def test_a_pg_backup_is_a_dump_pg_restore_reads_and_holds_no_keys(world: World, tmp_path: Path) -> None:
    archive = tmp_path / "b.tar.gz"
    meta = _backup(world, archive)
    assert meta["database"] == "postgresql" and meta["keys_included"] is False
    assert archive.stat().st_mode & 0o077 == 0, "the backup is the owner's only"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extract(PG_DUMP_NAME, tmp_path, filter="data")
    assert "siteplan.db" not in names and not any("keys" in n or n.endswith(".key") for n in names)
    # The operator's own tool reads it: every table of the service is in it, with its data.
    listing = subprocess.run(["pg_restore", "--list", str(tmp_path / PG_DUMP_NAME)], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    for table in ("contracts", "photos", "subjects", "register_entries", "alembic_version"):
        assert f"TABLE DATA public {table} " in listing.stdout, table
    assert not list(tmp_path.glob("**/.tmp-*")), "no partial archive is left"


def test_pg_restore_does_not_resurrect_an_ended_contract(world: World, tmp_path: Path) -> None:
    w = world
    archive = tmp_path / "b.tar.gz"
    _backup(w, archive)
    with pytest.raises(BackupError, match="--force"):
        _restore(w, archive, force=False)
    terminate_contract(w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy")
    rep = _restore(w, archive)
    assert rep.unrecoverable == [w.c1.id]
    with init_db(w.settings.db_url)() as db:
        assert db.scalars(select(Photo).where(Photo.contract_id == w.c1.id)).all() == []
        assert db.get(Contract, w.c1.id).state == "ended"  # type: ignore[union-attr]
        assert len(db.scalars(select(Photo).where(Photo.contract_id == w.c2.id)).all()) == len(PHOTOS)
    assert _scan(w.settings.root, w.c1.ciphertext) == []
    assert sorted(w.vault.objects(w.c2.id)) == sorted(w.c2.objects)


def test_pg_restore_keeps_an_erasure_the_register_and_a_certificate(world: World, tmp_path: Path) -> None:
    w = world
    archive = tmp_path / "b.tar.gz"
    _backup(w, archive)
    with w.factory() as db:
        at_backup = len(register.export_register(db, w.tenant_id))
    with w.factory.begin() as db:
        s = db.get(Subject, w.c2.subject_id)
        assert s is not None
        erase_subject(db, w.vault, s)
        register.record(
            db, tenant_id=w.tenant_id, actor="operator", action="subject_erased", categories=["subject_identity"],
            purpose="erasure (P7)", ref=w.c2.subject_id,
        )  # fmt: skip
    signed = terminate_contract(
        w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy"
    )
    with w.factory() as db:
        before = register.export_register(db, w.tenant_id)
    rep = _restore(w, archive)
    assert rep.erasures_replayed == 1 and rep.certificates_restored == 1
    assert rep.register_entries_replayed == len(before) - at_backup
    with init_db(w.settings.db_url)() as db:
        after = register.export_register(db, w.tenant_id)
        assert after[: len(before)] == before and len(after) == len(before) + 1
        assert db.get(Subject, w.c2.subject_id) is None
        assert db.scalars(select(Photo).where(Photo.contract_id == w.c2.id)).all() == []
        assert db.scalars(select(Certificate).where(Certificate.contract_id == w.c1.id)).one().document == signed
        assert register.verify_register(db, w.tenant_id).ok


def test_a_failed_pg_restore_leaves_the_database_as_it_was(world: World, tmp_path: Path) -> None:
    w = world
    archive = tmp_path / "b.tar.gz"
    _backup(w, archive)
    # A damaged dump (truncated: a disk that filled up while copying it, say).
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    dump = tmp_path / "x" / PG_DUMP_NAME
    dump.write_bytes(dump.read_bytes()[: dump.stat().st_size // 2])
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:
        for p in sorted((tmp_path / "x").iterdir()):
            tar.add(p, arcname=p.name)
    with w.factory.begin() as db:
        t = create_tenant(db, w.vault.keys, label="after the backup")
        tid = t.id
    with pytest.raises(BackupError, match=r"pg_restore|psql"):
        _restore(w, broken)
    with init_db(w.settings.db_url)() as db:  # all of it there still, the later tenant too
        assert db.get(Contract, w.c1.id) is not None
        assert len(db.scalars(select(Photo)).all()) == 2 * len(PHOTOS)
        assert db.execute(text("SELECT count(*) FROM tenants WHERE id = :i"), {"i": tid}).scalar() == 1
    assert sorted(w.vault.objects(w.c1.id)) == sorted(w.c1.objects), "the vault is untouched too"


def test_the_cli_backs_up_and_restores_postgresql(tmp_path: Path, pg_url: str) -> None:
    """siteplan backup / restore as an operator runs them, with a password-carrying URL that
    must never show on a command line."""
    env = {
        **os.environ,
        "SITEPLAN_DATA_DIR": str(tmp_path / "data"),
        "SITEPLAN_DATABASE_URL": pg_url.replace("postgres@", "postgres:s3cret-pw@"),  # trust auth ignores it
    }
    cli = [sys.executable, "-m", "cli.main"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=False)

    made = run("tenant", "create", "Acme Gates", "--with-contract")
    assert made.returncode == 0, made.stderr
    out = run("backup", str(tmp_path / "b.tar.gz"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["database"] == "postgresql"
    refused = run("restore", str(tmp_path / "b.tar.gz"))
    assert refused.returncode != 0 and "--force" in refused.stderr
    done = run("restore", str(tmp_path / "b.tar.gz"), "--force")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unrecoverable_contracts"] == []
    assert "s3cret-pw" not in out.stdout + out.stderr + done.stdout + done.stderr
    with create_engine(pg_url).connect() as c:
        assert c.execute(text("SELECT count(*) FROM contracts")).scalar() == 1
    # A SQLite backup is not restored into PostgreSQL (nor the other way).
    sqlite_env = {"SITEPLAN_DATA_DIR": str(tmp_path / "lite"), **{k: v for k, v in os.environ.items()}}
    sqlite_env.pop("SITEPLAN_DATABASE_URL", None)
    lite = subprocess.run([*cli, "tenant", "create", "X"], env=sqlite_env, cwd=ROOT, capture_output=True, text=True)
    assert lite.returncode == 0, lite.stderr
    subprocess.run([*cli, "backup", str(tmp_path / "lite.tar.gz")], env=sqlite_env, cwd=ROOT, check=True)
    wrong = run("restore", str(tmp_path / "lite.tar.gz"), "--force")
    assert wrong.returncode != 0 and "holds a sqlite database" in wrong.stderr


def test_a_database_restored_by_other_means_is_reconciled(world: World, tmp_path: Path) -> None:
    """A managed snapshot or point-in-time recovery brings erased subjects and destroyed contracts
    back; `siteplan restore --reconcile-only` takes them out again, and is a no-op after."""
    w = world
    url = w.settings.db_url.replace("+psycopg", "")
    snapshot = tmp_path / "snapshot.dump"
    subprocess.run(["pg_dump", "--format=custom", f"--file={snapshot}", url], check=True)
    with w.factory.begin() as db:
        s = db.get(Subject, w.c2.subject_id)
        assert s is not None
        erase_subject(db, w.vault, s)
    terminate_contract(w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy")
    w.factory.kw["bind"].dispose()
    # The provider's restore, not ours: everything as it was at the snapshot.
    subprocess.run(
        ["pg_restore", "--clean", "--if-exists", "--no-owner", "--single-transaction", "-d", url, str(snapshot)],
        check=True,
        capture_output=True,
    )
    with init_db(w.settings.db_url)() as db:
        assert db.get(Subject, w.c2.subject_id) is not None, "the snapshot brought the erased subject back"
    env = {**os.environ, "SITEPLAN_DATA_DIR": str(w.settings.data_dir), "SITEPLAN_DATABASE_URL": w.settings.db_url}
    cli = [sys.executable, "-m", "cli.main", "restore", "--reconcile-only"]
    first = subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    rep = json.loads(first.stdout)
    assert rep["erasures_replayed"] == 1 and rep["unrecoverable_contracts"] == [w.c1.id]
    assert rep["certificates_restored"] == 1
    with init_db(w.settings.db_url)() as db:
        assert db.get(Subject, w.c2.subject_id) is None
        assert db.scalars(select(Photo).where(Photo.contract_id == w.c1.id)).all() == []
        assert db.get(Contract, w.c1.id).state == "ended"  # type: ignore[union-attr]
        assert register.verify_register(db, w.tenant_id).ok
    again = json.loads(subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    assert again["erasures_replayed"] == 0 and again["unrecoverable_contracts"] == []
    both = subprocess.run([*cli, str(tmp_path / "x.tar.gz")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert both.returncode != 0 and "not both" in both.stderr
