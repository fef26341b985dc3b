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

from dataprotection.vault import KeyStore, open_field, seal_field
from siteplan.db import Design, Project, new_id


def _reference_context(project_id: str) -> str:
    return f"projects/{project_id}/reference"


def _name_context(design_id: str) -> str:
    return f"designs/{design_id}/name"


def seal_reference(keys: KeyStore, contract_id: str, project_id: str, reference: str) -> str:
    return seal_field(keys.get(contract_id), reference, context=_reference_context(project_id))


def unseal_reference(keys: KeyStore, contract_id: str, project_id: str, sealed: str) -> str:
    """The reference as typed; "" for one revision 0004 found under an ended contract (its key gone)."""
    if not sealed:
        return ""
    return open_field(keys.get(contract_id), sealed, context=_reference_context(project_id))


def open_reference(keys: KeyStore, project: Project) -> str:
    return unseal_reference(keys, project.contract_id, project.id, project.reference_enc)


def seal_design_name(keys: KeyStore, contract_id: str, design_id: str, name: str) -> str:
    return seal_field(keys.get(contract_id), name, context=_name_context(design_id))


def unseal_design_name(keys: KeyStore, contract_id: str, design_id: str, sealed: str) -> str:
    return open_field(keys.get(contract_id), sealed, context=_name_context(design_id))


def design_descriptor(keys: KeyStore, design: Design) -> dict[str, Any]:
    """The descriptor as the designer sent it: the stored one, with its name opened."""
    out = dict(design.descriptor)
    if design.name_enc is not None:
        out["name"] = unseal_design_name(keys, design.contract_id, design.id, design.name_enc)
    return out


def new_project(
    db: Session, keys: KeyStore, *, tenant_id: str, contract_id: str, reference: str, subject_id: str | None = None
) -> Project:
    """Insert a project, its reference sealed (the row's id is part of the seal)."""
    pid = new_id()
    p = Project(
        id=pid,
        tenant_id=tenant_id,
        contract_id=contract_id,
        subject_id=subject_id,
        reference_enc=seal_reference(keys, contract_id, pid, reference),
    )
    db.add(p)
    db.flush()
    return p


def new_design(
    db: Session, keys: KeyStore, *, tenant_id: str, project_id: str, contract_id: str, descriptor: dict[str, Any]
) -> Design:
    """Insert a design; its ``name`` goes sealed into ``name_enc``, the rest (units, axes,
    numbers) stays readable in ``descriptor``."""
    did = new_id()
    desc = dict(descriptor)
    name = desc.pop("name", None)
    d = Design(
        id=did,
        tenant_id=tenant_id,
        project_id=project_id,
        contract_id=contract_id,
        descriptor=desc,
        name_enc=None if name is None else seal_design_name(keys, contract_id, did, str(name)),
    )
    db.add(d)
    db.flush()
    return d
