"""The register of processing (GDPR Art. 30(2), MISSION P9): append-only and hash-chained.

Each entry records who asked for what processing, on which categories of data, for which
purpose, and when. Entry n stores SHA-256(entry n's canonical JSON ‖ hash of entry n-1), per
controller. Editing, removing or reordering any entry breaks every hash after it;
``verify_chain`` finds the first bad one. Truncating the newest entries is caught against an
exported copy or a certificate that quotes the head hash (docs/data-protection.md).

Every committed entry is also appended to a journal beside the keys (``register.jsonl``), which
no backup holds, as the erasure ledger is. A restore puts back the entries made after the backup
was taken, verbatim (:func:`replay_journal`): the chain, and the head hashes that certificates
made since then quote, stay whole. The journal holds what the register holds: ids, actions,
categories and purposes, never a name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction

from siteplan.db import JOURNAL_INFO, RegisterEntry, Tenant
from siteplan.db import journal_path as journal_path  # re-exported: asked of the register

log = logging.getLogger(__name__)

GENESIS = "0" * 64
# Session.info key of the entries this session's transaction added, written to the journal once
# it commits (the journal's own path and key, JOURNAL_INFO, are set by siteplan.db.init_db).
PENDING_INFO = "register_pending"
CATEGORIES = ("photos", "derived_media", "site_models", "subject_identity", "subject_contact", "account")


def _canonical(e: RegisterEntry | dict[str, Any]) -> bytes:
    d = e if isinstance(e, dict) else entry_json(e)
    body = {k: d[k] for k in ("tenant_id", "seq", "at", "actor", "action", "categories", "purpose", "ref")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# One act, one name. The CLI once recorded the subject rights under names of its own; those
# entries stay as they were stored (each entry's hash covers its action, and every later entry's
# hash covers that one), and are read with the act's one name beside: ``act`` in entry_json.
ACT_NAMES = {
    "subject_rectify": "subject_rectified",
    "subject_restrict": "subject_restricted",
    "subject_lift": "subject_restriction_lifted",
    "subject_export": "subject_exported",
    "subject_erase": "subject_erased",
}


def act_name(action: str) -> str:
    """The one name of the act an entry records (an old name mapped, ``ACT_NAMES``)."""
    return ACT_NAMES.get(action, action)


def entry_json(e: RegisterEntry) -> dict[str, Any]:
    """An entry as exported and hashed. An entry stored under an old name of its act also
    carries ``act``, the act's one name (not hashed: the chain stays as stored)."""
    at = e.at.astimezone(UTC) if e.at.tzinfo else e.at.replace(tzinfo=UTC)
    out = {
        "tenant_id": e.tenant_id,
        "seq": e.seq,
        "at": at.isoformat(timespec="microseconds"),
        "actor": e.actor,
        "action": e.action,
        "categories": e.categories.split(),
        "purpose": e.purpose,
        "ref": e.ref,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    }
    if act_name(e.action) != e.action:
        out["act"] = act_name(e.action)
    return out


def chain_hash(body: bytes, prev: str) -> str:
    return hashlib.sha256(body + prev.encode()).hexdigest()


def record(
    db: Session,
    *,
    tenant_id: str,
    actor: str,
    action: str,
    categories: list[str],
    purpose: str,
    ref: str | None = None,
) -> RegisterEntry:
    """Append one entry in the caller's transaction. ``actor`` is a token id or ``system``;
    ``ref`` an object id (contract, project, job, subject): never a name or a file name."""
    bad = [c for c in categories if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown data categories: {bad}")
    # Serialise appends per controller (a row lock on PostgreSQL; SQLite serialises writers).
    # FOR NO KEY UPDATE, not FOR UPDATE: a row inserted earlier in this transaction (a subject)
    # holds KEY SHARE on the tenant's row through its foreign key, and FOR UPDATE conflicts with
    # that, so two such requests deadlocked (a 500 on PostgreSQL).
    db.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    last = _last(db, tenant_id)
    seq = 1 if last is None else last.seq + 1
    prev = GENESIS if last is None else last.hash
    e = RegisterEntry(
        tenant_id=tenant_id,
        seq=seq,
        at=datetime.now(UTC),
        actor=actor,
        action=action,
        categories=" ".join(sorted(set(categories))),
        purpose=purpose,
        ref=ref,
        prev_hash=prev,
        hash="",
    )
    e.hash = chain_hash(_canonical(e), prev)
    db.add(e)
    db.flush()
    if db.info.get(JOURNAL_INFO):
        # Kept with the (sub)transaction it was made in: journaled only once the outermost one
        # commits, dropped if that or a savepoint around it rolls back.
        tx = db.get_nested_transaction() or db.get_transaction()
        db.info.setdefault(PENDING_INFO, []).append((tx, entry_json(e)))
    return e


def _last(db: Session, tenant_id: str) -> RegisterEntry | None:
    """The controller's newest entry (whichever tenant the session is scoped to)."""
    return db.scalars(
        select(RegisterEntry)
        .where(RegisterEntry.tenant_id == tenant_id)
        .order_by(RegisterEntry.seq.desc())
        .limit(1)
        .execution_options(include_all_tenants=True)
    ).first()


def _within(tx: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while tx is not None:
        if tx is outer:
            return True
        tx = tx.parent
    return False


def _take(session: Session, outer: SessionTransaction) -> list[dict[str, Any]]:
    """Remove and return the pending entries made inside ``outer``."""
    pending = session.info.get(PENDING_INFO) or []
    taken = [d for tx, d in pending if _within(tx, outer)]
    session.info[PENDING_INFO] = [(tx, d) for tx, d in pending if not _within(tx, outer)]
    return taken


@event.listens_for(Session, "after_commit")
def _journal_committed(session: Session) -> None:
    root = session.get_transaction()
    if session.get_nested_transaction() is not None or root is None:
        return  # a savepoint released: its entries wait for the outermost transaction
    entries = _take(session, root)
    path = session.info.get(JOURNAL_INFO)
    if not entries or not path:
        return
    lines = "".join(json.dumps(d, sort_keys=True) + "\n" for d in entries).encode()
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, lines)  # one write: lines of concurrent processes never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:  # the entries are committed; only a later restore would miss them
        log.warning("register journal not written (%s): a restore would not bring these back", type(exc).__name__)


@event.listens_for(Session, "after_soft_rollback")
def _journal_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    _take(session, previous_transaction)


@event.listens_for(Session, "after_transaction_end")
def _journal_ended(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # closed without a commit (Session.close): never journaled
        _take(session, transaction)


@dataclass(frozen=True)
class JournalReplay:
    replayed: int  # entries put back
    left_out: int  # later entries that could not be: the chain broke before them (a gap)


def replay_journal(db: Session, path: Path | None) -> JournalReplay:
    """Put back, verbatim, the journal's entries that continue each controller's chain in a
    restored database (made after the backup). An entry that does not chain (a torn last line,
    another database's) is passed over; entries after a gap (a crash between a commit and its
    journal line) cannot follow and are counted in ``left_out``. A controller the database does
    not hold is left out."""
    if path is None or not path.exists():
        return JournalReplay(0, 0)
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
            by_tenant.setdefault(str(d["tenant_id"]), []).append(d)
        except (ValueError, KeyError, TypeError):
            continue
    n = left = 0
    for tenant_id, entries in by_tenant.items():
        if db.get(Tenant, tenant_id) is None:
            continue
        last = _last(db, tenant_id)
        seq, head = (0, GENESIS) if last is None else (last.seq, last.hash)
        for d in sorted(entries, key=lambda d: int(d.get("seq", 0))):
            try:
                follows = (
                    d["seq"] == seq + 1 and d["prev_hash"] == head and chain_hash(_canonical(d), head) == d["hash"]
                )
            except (KeyError, TypeError):
                follows = False
            if not follows:
                continue
            db.add(
                RegisterEntry(
                    tenant_id=tenant_id,
                    seq=d["seq"],
                    at=datetime.fromisoformat(d["at"]),
                    actor=d["actor"],
                    action=d["action"],
                    categories=" ".join(d["categories"]),
                    purpose=d["purpose"],
                    ref=d["ref"],
                    prev_hash=d["prev_hash"],
                    hash=d["hash"],
                )
            )
            seq, head = d["seq"], d["hash"]
            n += 1
        left += len({d.get("seq") for d in entries if isinstance(d.get("seq"), int) and d["seq"] > seq})
    db.flush()
    return JournalReplay(n, left)


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    entries: int
    head: str
    problem: str | None = None


def verify_entries(entries: list[dict[str, Any]]) -> ChainCheck:
    """Check an exported or stored chain (dicts as :func:`entry_json` writes them)."""
    prev = GENESIS
    for i, d in enumerate(entries, 1):
        if d["seq"] != i:
            return ChainCheck(False, len(entries), prev, f"entry {i} is missing (found seq {d['seq']})")
        if d["prev_hash"] != prev:
            return ChainCheck(False, len(entries), prev, f"entry {i} does not follow entry {i - 1}")
        if chain_hash(_canonical(d), prev) != d["hash"]:
            return ChainCheck(False, len(entries), prev, f"entry {i} was altered")
        prev = d["hash"]
    return ChainCheck(True, len(entries), prev)


def export_register(db: Session, tenant_id: str) -> list[dict[str, Any]]:
    rows = db.scalars(
        select(RegisterEntry)
        .where(RegisterEntry.tenant_id == tenant_id)
        .order_by(RegisterEntry.seq)
        .execution_options(include_all_tenants=True)
    ).all()
    return [entry_json(e) for e in rows]


def verify_register(db: Session, tenant_id: str) -> ChainCheck:
    return verify_entries(export_register(db, tenant_id))
