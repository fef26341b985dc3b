"""One act, one name in the register: the subject rights record one action name each, whether the
API or the CLI exercises them, and entries stored under the CLI's old names are read with the
act's one name beside, the chain left as stored (dataprotection/register.py, ACT_NAMES)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from dataprotection import register, rights
from dataprotection.subjects import SubjectFields, new_subject, read_fields
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore, Vault
from siteplan.db import init_db


def test_each_right_records_its_one_name_and_old_names_read_as_the_act(tmp_path: Path) -> None:
    keys = FileKeyStore(tmp_path / "keys")
    factory = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}", keys)
    vault = Vault(tmp_path / "vault", keys)
    with factory.begin() as db:
        tid = create_tenant(db, keys, label="T").id
        cid = create_contract(db, keys, tenant_id=tid).id
        s = new_subject(db, keys, tenant_id=tid, contract_id=cid, f=SubjectFields("An Peeters", "Dorpstraat 1"))
        # An entry the CLI recorded before the rights had one implementation.
        register.record(
            db, tenant_id=tid, actor="operator", action="subject_lift", categories=["account"], purpose="old", ref=s.id
        )
        rights.rectify(db, keys, s, actor="tok", phone="0470")
        assert read_fields(keys, s) == SubjectFields("An Peeters", "Dorpstraat 1", "0470")  # the rest kept
        rights.set_restriction(db, s, True, actor="tok")
        rights.set_restriction(db, s, False, actor="tok")
        z = zipfile.ZipFile(io.BytesIO(rights.access(db, vault, s, actor="tok")))
        assert b"An Peeters" in z.read("subject.json")
        rights.erase(db, vault, s, None, actor="tok")
    with factory() as db:
        entries = register.export_register(db, tid)
        assert register.verify_register(db, tid).ok  # nothing rewritten
    acts = [(e["action"], e.get("act")) for e in entries if e["ref"] == s.id]
    assert acts == [
        ("subject_lift", "subject_restriction_lifted"),  # stored as it was, read as the act
        ("subject_rectified", None),
        ("subject_restricted", None),
        ("subject_restriction_lifted", None),
        ("subject_exported", None),
        ("subject_erased", None),
    ]
    cats = {e["action"]: e["categories"] for e in entries}
    restricted, lifted = sorted(cats["subject_restricted"]), sorted(cats["subject_restriction_lifted"])
    assert restricted == lifted == ["derived_media", "photos"]
