"""Backup and restore of the embedded store (P6): the SQLite database and the vault's sealed
objects. The key store is deliberately **not** in the backup: a contract whose key has been
destroyed since stays unreadable after a restore, and restore removes what it cannot decrypt
instead of resurrecting it. (PostgreSQL deployments back up the DB with their own tools; the
vault part and the restore check below apply the same.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from privacy import register, signing
from privacy.rights import delete_contract_rows, replay_erasures
from privacy.vault import Vault
from siteplan.db import Certificate, Contract

log = logging.getLogger(__name__)
FORMAT = "siteplan.backup/v1"


class BackupError(RuntimeError):
    pass


def backup(*, db_file: Path, vault_root: Path, out: Path) -> dict[str, object]:
    """Write ``out`` (a .tar.gz): a consistent copy of the DB (SQLite's online backup) and the vault."""
    if not db_file.is_file():
        raise BackupError("only the embedded SQLite store can be backed up this way; use pg_dump for PostgreSQL")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        snap = Path(tmp) / "siteplan.db"
        src = sqlite3.connect(db_file)
        dst = sqlite3.connect(snap)
        with dst:
            src.backup(dst)
        src.close()
        dst.close()
        meta = {"format": FORMAT, "created_at": datetime.now(UTC).isoformat(), "keys_included": False}
        (Path(tmp) / "backup.json").write_text(json.dumps(meta))
        part = out.with_name(f".tmp-{out.name}")
        # Owner-only: the archive holds sealed objects, but also the database's ids and clear fields.
        fd = os.open(part, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            tar.add(Path(tmp) / "backup.json", arcname="backup.json")
            tar.add(snap, arcname="siteplan.db")
            if (vault_root / "objects").exists():
                tar.add(vault_root / "objects", arcname="vault/objects")
        os.replace(part, out)
    return meta


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
) -> RestoreReport:
    """Unpack a backup over the data dir, then drop every contract whose data key no longer exists."""
    if db_file.exists() and not force:
        raise BackupError("a database is already there; restore with --force to replace it")
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
        if "backup.json" not in names or "siteplan.db" not in names:
            raise BackupError("not a Siteplan backup")
        with tempfile.TemporaryDirectory(dir=db_file.parent) as tmp:
            tar.extractall(tmp, filter="data")
            meta = json.loads((Path(tmp) / "backup.json").read_text())
            if meta.get("format") != FORMAT:
                raise BackupError("unknown backup format")
            db_file.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / "siteplan.db", db_file)
            for suffix in ("-wal", "-shm"):
                Path(str(db_file) + suffix).unlink(missing_ok=True)
            if (vault_root / "objects").exists():
                shutil.rmtree(vault_root / "objects")
            if (Path(tmp) / "vault" / "objects").exists():
                vault_root.mkdir(parents=True, exist_ok=True)
                os.replace(Path(tmp) / "vault" / "objects", vault_root / "objects")
    factory = factory_for()
    gone: list[str] = []
    certs = 0
    with factory.begin() as db:
        # The register's entries made since the backup, first: what restore records follows them.
        journal = register.replay_journal(db, register.journal_path(vault.keys))
        contracts = db.scalars(select(Contract)).all()
        for c in contracts:
            if c.state == "ended" or vault.keys.exists(c.id):
                continue
            gone.append(c.id)
            delete_contract_rows(db, c.id)
            c.state = "ended"
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
