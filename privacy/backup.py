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

from privacy.rights import delete_contract_rows
from privacy.vault import Vault
from siteplan.db import Contract

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
        with tarfile.open(part, "w:gz") as tar:
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


def restore(
    archive: Path,
    *,
    db_file: Path,
    vault_root: Path,
    factory_for: Callable[[], sessionmaker[Session]],
    vault: Vault,
    force: bool = False,
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
    with factory.begin() as db:
        contracts = db.scalars(select(Contract)).all()
        for c in contracts:
            if c.state == "ended" or vault.keys.exists(c.id):
                continue
            gone.append(c.id)
            delete_contract_rows(db, c.id)
            c.state = "ended"
            vault.drop_container(c.id)
        n = len(contracts)
    for cid in gone:
        log.warning("contract %s: its data key was destroyed; its data cannot be restored and was removed", cid[:8])
    return RestoreReport(n, gone)
