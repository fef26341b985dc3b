"""The register of processing (GDPR Art. 30(2), MISSION P9): append-only and hash-chained.

Each entry records who asked for what processing, on which categories of data, for which
purpose, and when. Entry n stores SHA-256(entry n's canonical JSON ‖ hash of entry n-1), per
controller. Editing, removing or reordering any entry breaks every hash after it;
``verify_chain`` finds the first bad one. Truncating the newest entries is caught against an
exported copy or a certificate that quotes the head hash (docs/data-protection.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from siteplan.db import RegisterEntry, Tenant

GENESIS = "0" * 64
CATEGORIES = ("photos", "derived_media", "site_models", "subject_identity", "subject_contact", "account")


def _canonical(e: RegisterEntry | dict[str, Any]) -> bytes:
    d = e if isinstance(e, dict) else entry_json(e)
    body = {k: d[k] for k in ("tenant_id", "seq", "at", "actor", "action", "categories", "purpose", "ref")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def entry_json(e: RegisterEntry) -> dict[str, Any]:
    at = e.at.astimezone(UTC) if e.at.tzinfo else e.at.replace(tzinfo=UTC)
    return {
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
    db.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    last = db.scalars(
        select(RegisterEntry)
        .where(RegisterEntry.tenant_id == tenant_id)
        .order_by(RegisterEntry.seq.desc())
        .limit(1)
        .execution_options(include_all_tenants=True)
    ).first()
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
    return e


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
