"""Backup and restore (P6): the database and the vault's sealed objects. The database is SQLite
(its online backup API) or PostgreSQL (``pg_dump --format=custom``, restored with ``pg_restore``
through ``psql --single-transaction``: all of it or nothing). The key store is deliberately
**not** in the backup: a contract whose key has been destroyed since stays unreadable after a
restore, and restore removes what it cannot decrypt instead of resurrecting it; subjects erased
and register entries made since are replayed from the ledgers kept beside the keys."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dataprotection import register, signing
from dataprotection.rights import delete_contract_rows, replay_erasures
from dataprotection.vault import Vault
from siteplan.db import Certificate, Contract
from siteplan.files import atomic_file
from siteplan.states import ContractState

log = logging.getLogger(__name__)
FORMAT = "siteplan.backup/v1"


class BackupError(RuntimeError):
    pass


PG_DUMP_NAME = "siteplan.pgdump"  # the PostgreSQL database in an archive (pg_dump's custom format)


def is_postgresql(db_url: str | None) -> bool:
    return db_url is not None and make_url(db_url).get_backend_name() == "postgresql"


def backup(*, db_file: Path, vault_root: Path, out: Path, db_url: str | None = None) -> dict[str, object]:
    """Write ``out`` (a .tar.gz): a consistent copy of the DB and the vault. ``db_url`` a
    PostgreSQL URL: the DB is dumped with pg_dump (one snapshot), else ``db_file`` is SQLite."""
    pg = is_postgresql(db_url)
    if not pg and not db_file.is_file():
        raise BackupError("there is no database to back up at the data dir (SITEPLAN_DATA_DIR, SITEPLAN_DATABASE_URL)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        if pg:
            assert db_url is not None
            snap = Path(tmp) / PG_DUMP_NAME
            _pg_dump(db_url, snap)
        else:
            snap = Path(tmp) / "siteplan.db"
            src = sqlite3.connect(db_file)
            dst = sqlite3.connect(snap)
            with dst:
                src.backup(dst)
            src.close()
            dst.close()
        meta = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "keys_included": False,
            "database": "postgresql" if pg else "sqlite",
        }
        (Path(tmp) / "backup.json").write_text(json.dumps(meta))
        # Owner-only: the archive holds sealed objects, but also the database's ids and clear
        # fields; never a partial archive under any name.
        with atomic_file(out) as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(Path(tmp) / "backup.json", arcname="backup.json")
            tar.add(snap, arcname=snap.name)
            if (vault_root / "objects").exists():
                tar.add(vault_root / "objects", arcname="vault/objects")
    return meta


def _libpq(db_url: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL as a libpq connection URI without the password (command lines are
    visible to other users of the host), and the environment carrying the password."""
    url = make_url(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    conninfo = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return conninfo, env


def _pg_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise BackupError(f"{name} is not installed (Debian: postgresql-client, the server's major version or newer)")
    return exe


def _tool_error(tool: str, stderr: bytes) -> BackupError:
    # libpq's messages name the server and the role, never row contents; the last line says why.
    lines = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return BackupError(f"{tool} failed: {lines[-1] if lines else 'no message'}")


def _pg_dump(db_url: str, dest: Path) -> None:
    conninfo, env = _libpq(db_url)
    # One snapshot of the whole database (pg_dump's own transaction); no owners or grants, so it
    # restores into a database owned by another role (docs/operations.md "PostgreSQL").
    cmd = [_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--file={dest}", conninfo]
    proc = subprocess.run(cmd, env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise _tool_error("pg_dump", proc.stderr)


# Everything of the service's in the public schema goes first, in the restore's own transaction:
# a table the backup does not have (a later revision's) cannot keep rows the backup never saw.
_PG_CLEAR = """
DO $clear$ DECLARE r record; BEGIN
  FOR r IN SELECT format('%I.%I', schemaname, viewname) AS n FROM pg_views WHERE schemaname = 'public' LOOP
    EXECUTE 'DROP VIEW IF EXISTS ' || r.n || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', schemaname, tablename) AS n FROM pg_tables WHERE schemaname = 'public' LOOP
    EXECUTE 'DROP TABLE IF EXISTS ' || r.n || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', sequence_schema, sequence_name) AS n FROM information_schema.sequences
           WHERE sequence_schema = 'public' LOOP
    EXECUTE 'DROP SEQUENCE IF EXISTS ' || r.n || ' CASCADE';
  END LOOP;
  FOR r IN SELECT format('%I.%I', n.nspname, t.typname) AS n FROM pg_type t
           JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public' AND t.typtype = 'e' LOOP
    EXECUTE 'DROP TYPE IF EXISTS ' || r.n || ' CASCADE';
  END LOOP;
END $clear$;
"""


def _pg_has_schema(db_url: str) -> bool:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return bool(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _pg_restore(db_url: str, dump: Path) -> None:
    """Replace the database's contents with the dump, in one transaction: a failure anywhere
    (a broken dump, a lost connection) leaves the database as it was."""
    conninfo, env = _libpq(db_url)
    listing = subprocess.run([_pg_tool("pg_restore"), "--list", str(dump)], capture_output=True, check=False)
    if listing.returncode != 0:
        raise _tool_error("pg_restore", listing.stderr)
    psql_cmd = [_pg_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", conninfo]
    psql = subprocess.Popen(psql_cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert psql.stdin is not None and psql.stderr is not None
    try:
        psql.stdin.write(_PG_CLEAR.encode())
        psql.stdin.flush()
        script = subprocess.run(
            [_pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--file=-", str(dump)],
            stdout=psql.stdin,
            stderr=subprocess.PIPE,
            check=False,
        )
    finally:
        psql.stdin.close()
    err = psql.stderr.read()
    psql.wait()
    if script.returncode != 0:
        raise _tool_error("pg_restore", script.stderr)
    if psql.returncode != 0:
        raise _tool_error("psql", err)


@dataclass(frozen=True)
class RestoreReport:
    contracts: int
    unrecoverable: list[str]  # contracts whose key is gone: their data was not restored
    erasures_replayed: int = 0  # subjects erased after the backup was made, erased again
    certificates_restored: int = 0  # certificates of contracts ended after the backup, put back
    register_entries_replayed: int = 0  # register entries made after the backup, put back from the journal
    register_entries_left_out: int = 0  # later journal entries that could not follow (a gap in the journal)


def restore(
    archive: Path,
    *,
    db_file: Path,
    vault_root: Path,
    factory_for: Callable[[], sessionmaker[Session]],
    vault: Vault,
    force: bool = False,
    certificates_dir: Path | None = None,
    db_url: str | None = None,
) -> RestoreReport:
    """Unpack a backup over the data dir (the database: ``db_url`` when it is PostgreSQL, else
    the SQLite ``db_file``), then drop every contract whose data key no longer exists."""
    pg = is_postgresql(db_url)
    if not force and (_pg_has_schema(db_url) if pg and db_url else db_file.exists()):
        raise BackupError("a database is already there; restore with --force to replace it")
    db_file.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        if "backup.json" not in names or not {"siteplan.db", PG_DUMP_NAME} & set(names):
            raise BackupError("not a Siteplan backup")
        with tempfile.TemporaryDirectory(dir=db_file.parent) as tmp:
            tar.extractall(tmp, filter="data")
            meta = json.loads((Path(tmp) / "backup.json").read_text())
            if meta.get("format") != FORMAT:
                raise BackupError("unknown backup format")
            kind = meta.get("database", "sqlite")
            if kind != ("postgresql" if pg else "sqlite"):
                raise BackupError(
                    f"this backup holds a {kind} database; restore it where SITEPLAN_DATABASE_URL is {kind}"
                )
            if pg:
                assert db_url is not None
                _pg_restore(db_url, Path(tmp) / PG_DUMP_NAME)
            else:
                os.replace(Path(tmp) / "siteplan.db", db_file)
                for suffix in ("-wal", "-shm"):
                    Path(str(db_file) + suffix).unlink(missing_ok=True)
            if (vault_root / "objects").exists():
                shutil.rmtree(vault_root / "objects")
            if (Path(tmp) / "vault" / "objects").exists():
                vault_root.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / "vault" / "objects", vault_root / "objects")
    return reconcile(factory_for(), vault, certificates_dir=certificates_dir)


def reconcile(factory: sessionmaker[Session], vault: Vault, *, certificates_dir: Path | None = None) -> RestoreReport:
    """What every restore runs once the database is back, so that it never resurrects: drop the
    contracts whose data key was destroyed since, erase again the subjects erased since (the
    ledger beside the keys), put back the register's later entries and the certificates of
    contracts ended since. Safe on a database that was never restored (it finds nothing to do),
    and the way to bring a database restored by other means (a managed snapshot, point-in-time
    recovery) back in line: ``siteplan restore --reconcile-only``."""
    gone: list[str] = []
    certs = 0
    with factory.begin() as db:
        # The register's entries made since the backup, first: what restore records follows them.
        journal = register.replay_journal(db, register.journal_path(vault.keys))
        contracts = db.scalars(select(Contract)).all()
        for c in contracts:
            if c.state == ContractState.ENDED or vault.keys.exists(c.id):
                continue
            gone.append(c.id)
            delete_contract_rows(db, c.id)
            c.state = ContractState.ENDED
            vault.drop_container(c.id)
            certs += _restore_certificate(db, c, certificates_dir)
        n = len(contracts)
        # Subjects erased since the backup was made: erased again, and the register says so.
        replayed = replay_erasures(db, vault)
        for tenant, sid in replayed:
            register.record(
                db,
                tenant_id=tenant,
                actor="operator",
                action="subject_erased",
                categories=["subject_identity", "subject_contact", "photos", "derived_media", "site_models"],
                purpose="erasure (P7) applied again after a restore from a backup older than it",
                ref=sid,
            )
    for cid in gone:
        log.warning("contract %s: its data key was destroyed; its data cannot be restored and was removed", cid[:8])
    if replayed:
        log.warning("%d subjects erased after this backup was made were erased again", len(replayed))
    if journal.replayed:
        log.warning("%d register entries made after this backup was made were put back", journal.replayed)
    if journal.left_out:
        log.warning("%d later register entries could not be put back: the journal has a gap", journal.left_out)
    return RestoreReport(n, gone, len(replayed), certs, journal.replayed, journal.left_out)


def _restore_certificate(db: Session, contract: Contract, certificates_dir: Path | None) -> int:
    """Put back the certificate of a contract that ended after the backup was made, from the
    signed file the termination wrote (the backup holds the database only)."""
    if certificates_dir is None:
        return 0
    path = certificates_dir / f"destruction-{contract.id}.json"
    try:
        signed = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    doc = signed.get("document", {}) if isinstance(signed, dict) else {}
    if not signing.verify(signed) or doc.get("contract") != contract.id or doc.get("controller") != contract.tenant_id:
        return 0
    if db.scalars(select(Certificate).where(Certificate.contract_id == contract.id)).first() is None:
        db.add(Certificate(tenant_id=contract.tenant_id, contract_id=contract.id, document=signed))
        contract.disposition = doc.get("disposition") or contract.disposition
        return 1
    return 0
