"""Free text outside the subject record, sealed like it (P5): a project's reference, a design's name.

The designer types these, and nothing stops a client's name from going in ("Janssens carport").
So they are sealed with their contract's data key (AES-GCM, bound to row and column, as the
subject fields are). They are then unreadable in backups, in SQLite's WAL and free pages, and in
a PostgreSQL dump, and they die with the key when the contract ends (crypto-shredding). Nothing
searches or sorts by them, so no blind index is needed.

Rows are made through :func:`new_project` and :func:`new_design`, which seal as they insert.
Replay records (``Idempotency-Key``) hold only the new row's id: a replay reads the row again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from privacy.vault import KeyStore, open_field, seal_field
from siteplan.db import Design, Project


def _reference_context(project_id: str) -> str:
    return f"projects/{project_id}/reference"


def _name_context(design_id: str) -> str:
    return f"designs/{design_id}/name"


def seal_reference(keys: KeyStore, contract_id: str, project_id: str, reference: str) -> str:
    return seal_field(keys.get(contract_id), reference, context=_reference_context(project_id))


def open_reference(keys: KeyStore, project: Project) -> str:
    """The reference as typed; "" for one revision 0004 found under an ended contract (its key gone)."""
    if not project.reference_enc:
        return ""
    return open_field(keys.get(project.contract_id), project.reference_enc, context=_reference_context(project.id))


def seal_design_name(keys: KeyStore, contract_id: str, design_id: str, name: str) -> str:
    return seal_field(keys.get(contract_id), name, context=_name_context(design_id))


def design_descriptor(keys: KeyStore, design: Design) -> dict[str, Any]:
    """The descriptor as the designer sent it: the stored one, with its name opened."""
    out = dict(design.descriptor)
    if design.name_enc is not None:
        out["name"] = open_field(keys.get(design.contract_id), design.name_enc, context=_name_context(design.id))
    return out


def new_project(
    db: Session, keys: KeyStore, *, tenant_id: str, contract_id: str, reference: str, subject_id: str | None = None
) -> Project:
    """Insert a project, its reference sealed (the row's id is part of the seal: flushed first)."""
    p = Project(tenant_id=tenant_id, contract_id=contract_id, subject_id=subject_id, reference_enc="")
    db.add(p)
    db.flush()
    p.reference_enc = seal_reference(keys, contract_id, p.id, reference)
    db.flush()
    return p


def new_design(
    db: Session, keys: KeyStore, *, tenant_id: str, project_id: str, contract_id: str, descriptor: dict[str, Any]
) -> Design:
    """Insert a design; its ``name`` goes sealed into ``name_enc``, the rest (units, axes,
    numbers) stays readable in ``descriptor``."""
    desc = dict(descriptor)
    name = desc.pop("name", None)
    d = Design(tenant_id=tenant_id, project_id=project_id, contract_id=contract_id, descriptor=desc)
    db.add(d)
    db.flush()
    if name is not None:
        d.name_enc = seal_design_name(keys, contract_id, d.id, str(name))
        db.flush()
    return d
