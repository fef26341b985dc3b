"""Seal the free text outside the subject record: projects.reference, a design's name

projects.reference (clear) becomes projects.reference_enc, and the ``name`` in designs.descriptor
moves to designs.name_enc, both sealed with the contract's key (dataprotection/fields.py). Replay
records that held a project or design response keep only its id. The data step needs the key
store, which ``siteplan.db.migrate`` hands over; without it a database with rows to seal is
refused before anything changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 07:00:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
# Tables whose freed space held clear text this revision sealed: siteplan.db rewrites them
# afterwards on PostgreSQL (VACUUM FULL); SQLite's secure_delete has overwritten it already.
rewrite_tables = ("projects", "designs", "idempotency")

_projects = sa.table(
    "projects",
    sa.column("id", sa.String),
    sa.column("contract_id", sa.String),
    sa.column("reference", sa.String),
    sa.column("reference_enc", sa.Text),
)
_designs = sa.table(
    "designs",
    sa.column("id", sa.String),
    sa.column("contract_id", sa.String),
    sa.column("descriptor", sa.JSON),
    sa.column("name_enc", sa.Text),
)
_contracts = sa.table("contracts", sa.column("id", sa.String), sa.column("state", sa.String))
_replays = sa.table("idempotency", sa.column("id", sa.Integer), sa.column("body", sa.JSON))


def _keys(needed: bool) -> Any:
    keys = context.config.attributes.get("keys")
    if needed and keys is None:
        raise RuntimeError(
            "revision 0004 seals existing project references and design names with their contracts'"
            " keys: run it through siteplan (any siteplan command migrates with the key store)"
        )
    return keys


def upgrade() -> None:
    from dataprotection.fields import seal_design_name, seal_reference

    # Everything is read and sealed before the first schema change (a refusal changes nothing).
    conn = op.get_bind()
    projects = conn.execute(sa.select(_projects.c.id, _projects.c.contract_id, _projects.c.reference)).all()
    designs = conn.execute(sa.select(_designs.c.id, _designs.c.contract_id, _designs.c.descriptor)).all()
    keys = _keys(bool(projects or designs))
    ended = set(conn.execute(sa.select(_contracts.c.id).where(_contracts.c.state == "ended")).scalars())
    missing = {cid for _, cid, _ in [*projects, *designs] if not keys.exists(cid)}
    if missing - ended:
        # A key folder not mounted, or the wrong one: blanking every reference would be final.
        raise RuntimeError(
            f"revision 0004: {len(missing - ended)} contract(s) still running have no key in this key"
            " store: is SITEPLAN_KEYS_DIR right? Nothing was changed"
        )

    # An ended contract's key is gone and its data unreadable: its reference and names go too.
    refs = {pid: seal_reference(keys, cid, pid, ref) if cid not in missing else "" for pid, cid, ref in projects}
    descs: dict[str, tuple[dict[str, Any], str | None]] = {}
    for did, cid, desc in designs:
        rest = dict(desc or {})
        name = rest.pop("name", None)
        sealed = seal_design_name(keys, cid, did, str(name)) if name is not None and cid not in missing else None
        descs[did] = (rest, sealed)
    replays = {
        rid: {"id": body["id"]}
        for rid, body in conn.execute(sa.select(_replays.c.id, _replays.c.body)).all()
        if isinstance(body, dict) and "id" in body and ("reference" in body or "descriptor" in body)
    }

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reference_enc", sa.Text(), nullable=True))
    with op.batch_alter_table("designs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name_enc", sa.Text(), nullable=True))
    for pid, enc in refs.items():
        # The clear column is emptied before it is dropped: PostgreSQL's DROP COLUMN only hides it,
        # and a row's new version would otherwise carry the clear text on (siteplan.db rewrites
        # the tables afterwards, so the old versions go too).
        conn.execute(_projects.update().where(_projects.c.id == pid).values(reference_enc=enc, reference=""))
    for did, (rest, name_enc) in descs.items():
        conn.execute(_designs.update().where(_designs.c.id == did).values(descriptor=rest, name_enc=name_enc))
    for rid, body in replays.items():
        conn.execute(_replays.update().where(_replays.c.id == rid).values(body=body))
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.alter_column("reference_enc", existing_type=sa.Text(), nullable=False)
        batch_op.drop_column("reference")


def downgrade() -> None:
    from dataprotection.fields import unseal_design_name, unseal_reference

    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reference", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    projects = conn.execute(sa.select(_projects.c.id, _projects.c.contract_id, _projects.c.reference_enc)).all()
    designs = conn.execute(
        sa.select(_designs.c.id, _designs.c.contract_id, _designs.c.descriptor, _designs.c.name_enc)
    ).all()
    keys = _keys(bool(projects or designs))
    for pid, cid, enc in projects:
        ref = unseal_reference(keys, cid, pid, enc) if keys.exists(cid) else ""
        conn.execute(_projects.update().where(_projects.c.id == pid).values(reference=ref))
    for did, cid, desc, enc in designs:
        if enc and keys.exists(cid):
            name = unseal_design_name(keys, cid, did, enc)
            conn.execute(
                _designs.update().where(_designs.c.id == did).values(descriptor={**(desc or {}), "name": name})
            )
    # The earlier code replays a project or design from the whole stored response: forget them
    # all (a 24-hour retry cache) rather than answer a retry with a broken body.
    conn.execute(_replays.delete())
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.alter_column("reference", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("reference_enc")
    with op.batch_alter_table("designs", schema=None) as batch_op:
        batch_op.drop_column("name_enc")
