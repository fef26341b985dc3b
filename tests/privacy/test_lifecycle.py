"""The data-protection lifecycle (issue 8): encryption at rest, contract termination that leaves
nothing readable, resumable after a kill, signed certificates, the hash-chained register,
restriction checked at processing time, backups that cannot resurrect a destroyed contract."""

from __future__ import annotations

import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dataprotection import register, signing
from dataprotection.backup import RestoreReport, backup, restore
from dataprotection.fields import new_design, new_project
from dataprotection.lifecycle import (
    STEPS,
    ContractBusy,
    contract_lock,
    contract_shared,
    decrypt_transfer,
    terminate_contract,
    verify_certificate,
)
from dataprotection.rights import erase_subject, export_subject
from dataprotection.subjects import SubjectFields, new_subject, open_subject
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore, KeyDestroyed, UploadStaging, Vault
from privacy.anonymize import AnonymizationPolicy
from siteplan import PIPELINE_VERSION
from siteplan.db import Contract, Design, Job, Photo, PlanFile, RegisterEntry, Subject, init_db
from siteplan.paths import lifecycle_paths
from siteplan.settings import DataDir, Settings
from workers.ingest import ingest

SAMPLE = Path(__file__).parents[2] / "sample_data"
PHOTOS = [SAMPLE / "photos" / "street_people.jpg", SAMPLE / "photos" / "street_car.jpg"]


@dataclass
class ContractData:
    id: str
    name: str
    subject_id: str = ""
    project_id: str = ""
    objects: list[str] = field(default_factory=list)
    plaintext: list[bytes] = field(default_factory=list)  # fingerprints of personal bytes
    ciphertext: list[bytes] = field(default_factory=list)  # fingerprints of the sealed files


@dataclass
class World:
    settings: Settings
    factory: sessionmaker[Session]
    vault: Vault
    tenant_id: str
    c1: ContractData
    c2: ContractData


def _sample(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[mid : mid + 48]


def _fill(db: Session, vault: Vault, tenant_id: str, cd: ContractData, settings: Settings) -> None:
    keys = vault.keys
    f = SubjectFields(cd.name, "Kerkstraat 12, 9000 Gent", "+32 470 12 34 56")
    s = new_subject(db, keys, tenant_id=tenant_id, contract_id=cd.id, f=f)
    # Free text a designer may fill with the client's name: sealed like the subject (dataprotection/fields.py).
    reference, design_name = f"Carport {cd.id[:8]} Verbruggen", f"Gate {cd.id[:8]} for the Verbruggens"
    p = new_project(db, keys, tenant_id=tenant_id, contract_id=cd.id, subject_id=s.id, reference=reference)
    cd.subject_id, cd.project_id = s.id, p.id
    cd.plaintext += [cd.name.encode(), b"Kerkstraat 12", b"+32 470 12 34 56", reference.encode(), design_name.encode()]
    policy = AnonymizationPolicy(keep_original=True)  # keep it, so destruction has originals to find
    for src in PHOTOS:
        data = src.read_bytes()
        orig = vault.put(cd.id, data)
        res = ingest(vault, key_id=cd.id, original=orig.object_id, policy=policy)
        assert res.photo is not None
        db.add(
            Photo(
                tenant_id=tenant_id,
                project_id=p.id,
                contract_id=cd.id,
                length=len(data),
                state="anonymised",
                original_object=orig.object_id,
                object=res.photo.object_id,
                sha256=res.photo.sha256,
                intrinsics=res.intrinsics,
            )
        )
        cd.plaintext += [_sample(data), _sample(vault.read_bytes(cd.id, res.photo.object_id))]
    glb = (SAMPLE / "design" / "gate.glb").read_bytes()
    dobj = vault.put(cd.id, glb)
    d = new_design(
        db,
        keys,
        tenant_id=tenant_id,
        project_id=p.id,
        contract_id=cd.id,
        descriptor={"name": design_name, "units": "mm"},
    )
    d.file_format, d.object, d.size = "glb", dobj.object_id, dobj.size
    j = Job(
        tenant_id=tenant_id, project_id=p.id, state="done", pipeline_version=PIPELINE_VERSION, inputs={}, timings={}
    )
    db.add(j)
    db.flush()
    montage = vault.read_bytes(cd.id, res.photo.object_id)[::-1]  # stands in for a montage's bytes
    mobj = vault.put(cd.id, montage)
    db.add(
        PlanFile(
            tenant_id=tenant_id,
            job_id=j.id,
            contract_id=cd.id,
            name="montage_x.jpg",
            media_type="image/jpeg",
            object=mobj.object_id,
            size=mobj.size,
            sha256=mobj.sha256,
        )
    )
    cd.plaintext.append(_sample(montage))
    # An upload left half way, and a job's scratch left behind by a crash.
    st = UploadStaging(settings.uploads_dir / cd.id / "ab12", vault, cd.id, "ab12")
    st.append([PHOTOS[0].read_bytes()[:300_000]], limit=10**9)
    scratch = settings.scratch_dir / j.id
    scratch.mkdir(parents=True)
    (scratch / "x.jpg").write_bytes(b"scratch-" + cd.id.encode())
    cd.plaintext.append(b"scratch-" + cd.id.encode())
    register.record(
        db, tenant_id=tenant_id, actor="test", action="plan_produced", categories=["photos"], purpose="test", ref=j.id
    )


def _finish(w_vault: Vault, cd: ContractData) -> None:
    cd.objects = w_vault.objects(cd.id)
    for oid in cd.objects:
        cd.ciphertext.append(_sample(w_vault.object_path(cd.id, oid).read_bytes()))


@pytest.fixture
def world(tmp_path: Path) -> World:
    settings = Settings(data_dir=tmp_path / "data")
    settings.root.mkdir(parents=True)
    vault = Vault(settings.vault_dir, FileKeyStore(settings.key_dir))
    factory = init_db(settings.db_url, vault.keys)  # as the CLI and the server open it
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


def _service_key(w: World) -> str:
    """The service's public signing key: what a verifier on the server trusts."""
    return signing.public_b64(signing.load_or_create(lifecycle_paths(w.settings).signing_key))


def _scan(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(root)}" for n in needles if n in data]
    return hits


def test_nothing_personal_is_on_disk_in_plaintext(world: World) -> None:
    needles = [n for n in world.c1.plaintext + world.c2.plaintext if not n.startswith(b"scratch-")]
    assert _scan(world.settings.root, needles) == []


def test_destroy_leaves_nothing_and_keeps_the_other_contract(world: World, tmp_path: Path) -> None:
    w = world
    archive = tmp_path / "backups" / "before.tar.gz"
    backup(db_file=w.settings.root / "siteplan.db", vault_root=w.settings.vault_dir, out=archive)
    paths = lifecycle_paths(w.settings)
    signed = terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy")
    # The scan: data dir (DB, vault, uploads, scratch, Ray dir, keys) and the backups.
    assert _scan(w.settings.root, w.c1.plaintext + w.c1.ciphertext) == []
    assert not (w.settings.scratch_dir).exists() or _scan(w.settings.scratch_dir, w.c1.plaintext) == []
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    assert _scan(unpacked, w.c1.plaintext) == []  # the backup holds only ciphertext of it ...
    assert (unpacked / "vault" / "objects" / w.c1.id).exists()
    with pytest.raises(KeyDestroyed):  # ... that nothing can open any more
        Vault(unpacked / "vault", w.vault.keys).read_bytes(w.c1.id, w.c1.objects[0])
    # The other contract is intact and readable.
    assert sorted(w.vault.objects(w.c2.id)) == sorted(w.c2.objects)
    with w.factory() as db:
        s = db.get(Subject, w.c2.subject_id)
        assert s is not None
        assert open_subject(w.vault.keys, w.c2.id, s.id, s.name_enc, s.address_enc, s.phone_enc).name == "Marie Peeters"
        for ph in db.scalars(select(Photo).where(Photo.contract_id == w.c2.id)):
            assert w.vault.read_bytes(w.c2.id, ph.object or "")[:3] == b"\xff\xd8\xff"
        assert db.get(Contract, w.c1.id).state == "ended"  # type: ignore[union-attr]
    # The certificate lists what was destroyed, verifies, and checks the data dir.
    doc = signed["document"]
    assert sorted(doc["destroyed"]["object_ids"]) == sorted(w.c1.objects)
    assert doc["destroyed"]["scratch_files"] == 1 and doc["destroyed"]["uploads_in_progress_files"] >= 1
    check = verify_certificate(signed, vault=w.vault, data_dir=w.settings.root, service_public_key=_service_key(w))
    assert check.ok, check.problems
    assert (paths.certificates / f"destruction-{w.c1.id}.html").is_file()
    with w.factory() as db:
        assert register.verify_register(db, w.tenant_id).ok


@pytest.mark.parametrize("step", STEPS[:-1])
def test_termination_killed_at_any_step_resumes_to_the_same_result(world: World, step: str) -> None:
    w = world
    paths = lifecycle_paths(w.settings)

    class Killed(Exception):
        pass

    def kill(at: str) -> None:
        if at == step:
            raise Killed(at)

    with pytest.raises(Killed):
        terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy", checkpoint=kill)
    with w.factory() as db:
        assert db.get(Contract, w.c1.id).state == "terminating"  # type: ignore[union-attr]
    signed = terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy")
    assert sorted(signed["document"]["destroyed"]["object_ids"]) == sorted(w.c1.objects)
    assert _scan(w.settings.root, w.c1.plaintext + w.c1.ciphertext) == []
    assert not w.vault.keys.exists(w.c1.id)
    assert verify_certificate(signed, vault=w.vault, data_dir=w.settings.root, service_public_key=_service_key(w)).ok
    # A third run changes nothing and returns the same certificate.
    again = terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy")
    assert again == signed


def test_tampered_certificate_and_register_fail(world: World) -> None:
    w = world
    signed = terminate_contract(
        w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy"
    )
    forged = {**signed, "document": {**signed["document"], "disposition": "return"}}
    assert not verify_certificate(forged).signature_ok
    # Re-signed with a key of the forger's own: the signature holds, the signer does not.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    resigned = signing.sign(Ed25519PrivateKey.generate(), forged["document"])
    published = signing.fingerprint(_service_key(w))
    for check in (verify_certificate(resigned), verify_certificate(resigned, fingerprint=published)):
        assert check.signature_ok and not check.ok, check.problems
    assert verify_certificate(signed, fingerprint=published).ok  # away from the server, pinned
    assert not verify_certificate(signed).ok  # ... and not without a key to trust

    def entry(db: Session, seq: int) -> RegisterEntry:
        q = select(RegisterEntry).where(RegisterEntry.tenant_id == w.tenant_id, RegisterEntry.seq == seq)
        return db.scalars(q).one()

    # An edited entry is found ...
    with w.factory.begin() as db:
        assert register.verify_register(db, w.tenant_id).ok
        original = entry(db, 2).purpose
        entry(db, 2).purpose = "something else"
    with w.factory() as db:
        r = register.verify_register(db, w.tenant_id)
        assert not r.ok and "entry 2 was altered" in (r.problem or "")
    # ... and, with the edit undone (the chain is whole again), so is a removed one.
    with w.factory.begin() as db:
        entry(db, 2).purpose = original
    with w.factory() as db:
        assert register.verify_register(db, w.tenant_id).ok
    with w.factory.begin() as db:
        db.delete(entry(db, 3))
    with w.factory() as db:
        r = register.verify_register(db, w.tenant_id)
        assert not r.ok and "entry 3 is missing" in (r.problem or "")


def _restore(w: World, archive: Path) -> RestoreReport:
    """Restore over the world's data dir, as `siteplan restore --force` does."""
    w.factory.kw["bind"].dispose()
    return restore(
        archive,
        db_file=w.settings.root / "siteplan.db",
        vault_root=w.settings.vault_dir,
        factory_for=lambda: init_db(w.settings.db_url, w.vault.keys),
        vault=w.vault,
        force=True,
        certificates_dir=lifecycle_paths(w.settings).certificates,
    )


def test_backup_restore_does_not_resurrect_an_ended_contract(world: World, tmp_path: Path) -> None:
    w = world
    archive = tmp_path / "b.tar.gz"
    backup(db_file=w.settings.root / "siteplan.db", vault_root=w.settings.vault_dir, out=archive)
    terminate_contract(w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy")
    rep = _restore(w, archive)
    assert rep.unrecoverable == [w.c1.id]
    factory = init_db(w.settings.db_url)
    with factory() as db:
        assert db.scalars(select(Photo).where(Photo.contract_id == w.c1.id)).all() == []
        assert db.get(Contract, w.c1.id).state == "ended"  # type: ignore[union-attr]
        assert len(db.scalars(select(Photo).where(Photo.contract_id == w.c2.id)).all()) == len(PHOTOS)
    assert _scan(w.settings.root, w.c1.ciphertext) == []
    assert sorted(w.vault.objects(w.c2.id)) == sorted(w.c2.objects)


def test_restore_does_not_bring_back_an_erased_subject_or_lose_a_certificate(world: World, tmp_path: Path) -> None:
    """A backup made before an erasure and a termination: restored, the subject stays erased
    (their fields are sealed with a contract key that still exists, so only a replay keeps the
    erasure), the register says so, and the ended contract's certificate is back."""
    from siteplan.db import Certificate

    w = world
    archive = tmp_path / "b.tar.gz"
    backup(db_file=w.settings.root / "siteplan.db", vault_root=w.settings.vault_dir, out=archive)
    assert archive.stat().st_mode & 0o077 == 0, "the backup is the owner's only"
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
    assert len(before) > at_backup + 1
    rep = _restore(w, archive)
    assert rep.erasures_replayed == 1 and rep.certificates_restored == 1
    # The register's entries since the backup are back, verbatim, and the certificate's head with them.
    assert rep.register_entries_replayed == len(before) - at_backup
    with init_db(w.settings.db_url)() as db:
        after = register.export_register(db, w.tenant_id)
    assert after[: len(before)] == before and len(after) == len(before) + 1
    head = signed["document"]["register_head"]
    assert after[head["seq"] - 1]["hash"] == head["hash"]
    factory = init_db(w.settings.db_url)
    with factory() as db:
        assert db.get(Subject, w.c2.subject_id) is None
        assert db.scalars(select(Photo).where(Photo.contract_id == w.c2.id)).all() == []
        cert = db.scalars(select(Certificate).where(Certificate.contract_id == w.c1.id)).one()
        assert cert.document == signed
        assert register.verify_register(db, w.tenant_id).ok
        actions = [e.action for e in db.scalars(select(RegisterEntry).where(RegisterEntry.tenant_id == w.tenant_id))]
        assert actions[-1] == "subject_erased"
    assert w.vault.objects(w.c2.id) == []
    assert _scan(w.settings.root, [b"Marie Peeters"]) == []
    # Asked again, the ended contract answers with its certificate, not "ended without one".
    again = terminate_contract(
        factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy"
    )
    assert again == signed


def test_transfer_archive_opens_only_with_the_recipients_key(world: World) -> None:
    w = world
    recipient = X25519PrivateKey.generate()
    pub = recipient.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed = terminate_contract(
        w.factory,
        w.vault,
        lifecycle_paths(w.settings),
        contract_id=w.c2.id,
        disposition="transfer",
        recipient_public_pem=pub,
    )
    exp = signed["document"]["export"]
    blob = (lifecycle_paths(w.settings).exports / exp["file"]).read_bytes()
    assert b"Marie Peeters" not in blob
    priv = recipient.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    import hashlib
    import io
    import json

    z = zipfile.ZipFile(io.BytesIO(decrypt_transfer(priv, blob)))
    manifest = json.loads(z.read("manifest.json"))
    for f in manifest["files"]:
        assert hashlib.sha256(z.read(f["path"])).hexdigest() == f["sha256"]
    names = z.namelist()
    assert sum(n.endswith(".jpg") for n in names) >= len(PHOTOS) and "register.json" in names
    assert any(b"Marie Peeters" in z.read(n) for n in names if n.startswith("subjects/"))
    other = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(Exception):  # noqa: B017 - any failure: the wrong key must not open it
        decrypt_transfer(other, blob)


def test_restriction_is_checked_when_processing_starts(world: World) -> None:
    """Restrict a subject while their job is queued: the job refuses, and nothing is decrypted."""
    from workers.project_job import run_project_job

    w = world
    with w.factory.begin() as db:
        d = db.scalars(select(Design).where(Design.contract_id == w.c2.id)).one()
        j = Job(
            tenant_id=w.tenant_id,
            project_id=w.c2.project_id,
            state="queued",
            pipeline_version=PIPELINE_VERSION,
            inputs={"design_id": d.id, "reference": {"segments": []}, "placement": {}},
            timings={},
        )
        db.add(j)
        db.flush()
        job_id = j.id
    with w.factory.begin() as db:
        db.get(Subject, w.c2.subject_id).restricted = True  # type: ignore[union-attr]
    run_project_job(w.settings, w.factory, w.vault, job_id)
    with w.factory() as db:
        j2 = db.get(Job, job_id)
        assert j2 is not None and j2.state == "cancelled" and "restricted" in (j2.error or "")
    assert not (w.settings.scratch_dir / job_id).exists()


def test_subject_export_and_erasure(world: World) -> None:
    w = world
    with w.factory.begin() as db:
        s = db.get(Subject, w.c2.subject_id)
        assert s is not None
        z = zipfile.ZipFile(__import__("io").BytesIO(export_subject(db, w.vault, s)))
        assert b"Marie Peeters" in z.read("subject.json")
        assert sum(n.endswith(".jpg") for n in z.namelist()) >= len(PHOTOS)
        erase_subject(db, w.vault, s)
    with w.factory() as db:
        assert db.get(Subject, w.c2.subject_id) is None
        assert db.scalars(select(Photo).where(Photo.project_id == w.c2.project_id)).all() == []
    assert w.vault.objects(w.c2.id) == []
    assert sorted(w.vault.objects(w.c1.id)) == sorted(w.c1.objects)


def test_retention(world: World) -> None:
    from datetime import date, timedelta

    from cli.main import main
    from dataprotection.lifecycle import BILLING_RETENTION
    from siteplan.db import BillingRecord

    w = world
    with w.factory.begin() as db:
        db.add(BillingRecord(tenant_id=w.tenant_id, contract_id=w.c1.id, item="plan"))
        db.add(
            BillingRecord(
                tenant_id=w.tenant_id,
                contract_id=w.c2.id,
                item="plan",
                file_closed_on=date(2010, 1, 1),
                delete_after=date(2010, 1, 1) + BILLING_RETENTION,
            )
        )
    terminate_contract(w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy")
    with w.factory() as db:
        kept = db.scalars(select(BillingRecord).where(BillingRecord.contract_id == w.c1.id)).one()
        assert kept.delete_after is not None and kept.delete_after - date.today() >= timedelta(days=7 * 365)
    import os

    os.environ["SITEPLAN_DATA_DIR"] = str(w.settings.data_dir)
    try:
        assert main(["retention"]) == 0
    finally:
        del os.environ["SITEPLAN_DATA_DIR"]
    with w.factory() as db:
        left = db.scalars(select(BillingRecord)).all()
        assert [b.contract_id for b in left] == [w.c1.id]  # the 2010 file is past its 7 years


def test_incident_helper(world: World) -> None:
    from datetime import UTC, datetime, timedelta

    from dataprotection.incident import affected_by_object, affected_in_window

    w = world
    with w.factory() as db:
        ph = db.scalars(select(Photo).where(Photo.contract_id == w.c1.id)).first()
        assert ph is not None and ph.object is not None
        hit = affected_by_object(db, ph.object)
        assert hit["controllers"] == [w.tenant_id] and hit["subjects"] == [w.c1.subject_id]
        now = datetime.now(UTC)
        window = affected_in_window(db, now - timedelta(hours=1), now + timedelta(minutes=1))
        assert w.tenant_id in window["controllers"]
        assert {w.c1.subject_id, w.c2.subject_id} <= set(window["subjects"])


@pytest.mark.slow
def test_termination_survives_sigkill(world: World) -> None:
    """A real kill -9 of `siteplan contract end` at random moments, then a re-run: it finishes,
    and nothing of the contract is left."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    w = world
    w.factory.kw["bind"].dispose()
    env = os.environ | {"SITEPLAN_DATA_DIR": str(w.settings.data_dir)}
    cmd = [str(Path(sys.executable).parent / "siteplan"), "contract", "end", w.c1.id, "--disposition", "destroy"]
    rng = random.Random(3)
    for _ in range(3):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))  # start-up takes ~2 s; the work itself well under one
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not w.vault.keys.exists(w.c1.id)
    assert _scan(w.settings.root, w.c1.plaintext + w.c1.ciphertext) == []
    cert = json.loads((lifecycle_paths(w.settings).certificates / f"destruction-{w.c1.id}.json").read_text())
    assert verify_certificate(cert, vault=w.vault, data_dir=w.settings.root, service_public_key=_service_key(w)).ok
    assert sorted(cert["document"]["destroyed"]["object_ids"]) == sorted(w.c1.objects)


def test_subject_rights_from_the_cli(world: World, tmp_path: Path) -> None:
    import os

    from cli.main import main

    w = world
    os.environ["SITEPLAN_DATA_DIR"] = str(w.settings.data_dir)
    try:
        assert main(["subject", "rectify", w.c2.subject_id, "--name", "Marie Peeters-Claes"]) == 0
        assert main(["subject", "restrict", w.c2.subject_id]) == 0
        out = tmp_path / "s.zip"
        assert main(["subject", "export", w.c2.subject_id, "--out", str(out)]) == 0
        assert b"Marie Peeters-Claes" in zipfile.ZipFile(out).read("subject.json")
        assert main(["subject", "erase", w.c2.subject_id]) == 0
    finally:
        del os.environ["SITEPLAN_DATA_DIR"]
    with w.factory() as db:
        assert db.get(Subject, w.c2.subject_id) is None
        entries = register.export_register(db, w.tenant_id)
        actions = [e["action"] for e in entries]
        # The same one name per act as the API records (dataprotection.rights), the operator as actor.
        acts = ["subject_rectified", "subject_restricted", "subject_exported", "subject_erased"]
        assert [a for a in actions if a in acts] == acts, actions
        assert all(e["actor"] == "operator" for e in entries if e["action"] in acts)
        assert register.verify_register(db, w.tenant_id).ok
    assert w.vault.objects(w.c2.id) == []


def test_erasure_takes_unfinished_uploads_and_replay_records(world: World) -> None:
    """An upload half sent for the subject's project, and the replay record of the request that
    created the project (it holds the project's reference), go with the erasure; the other
    contract's stay."""
    from dataprotection.rights import erase_subject
    from siteplan.db import IdempotencyRecord

    w = world
    with w.factory.begin() as db:
        ph = Photo(
            tenant_id=w.tenant_id, project_id=w.c2.project_id, contract_id=w.c2.id, length=10**6, state="uploading"
        )
        db.add(ph)
        db.flush()
        pid = ph.id
        for key, cd in (("k2", w.c2), ("k1", w.c1)):
            db.add(
                IdempotencyRecord(
                    tenant_id=w.tenant_id,
                    key=key,
                    fingerprint="f" * 64,
                    status=201,
                    body={"reference": "Driveway of " + cd.name},
                    location=f"/v1/projects/{cd.project_id}",
                )
            )
    staging = w.settings.uploads_dir / w.c2.id / pid
    UploadStaging(staging, w.vault, w.c2.id, pid).append([PHOTOS[0].read_bytes()[:200_000]], limit=10**9)
    (w.settings.uploads_dir / w.c2.id / f".{pid}.lock").write_bytes(b"")
    assert any(staging.iterdir())
    with w.factory.begin() as db:
        s = db.get(Subject, w.c2.subject_id)
        assert s is not None
        erase_subject(db, w.vault, s, w.settings.uploads_dir)
    assert not staging.exists() and not (w.settings.uploads_dir / w.c2.id / f".{pid}.lock").exists()
    with w.factory() as db:
        assert [r.key for r in db.scalars(select(IdempotencyRecord))] == ["k1"]
    # Contract end takes the rest.
    terminate_contract(w.factory, w.vault, lifecycle_paths(w.settings), contract_id=w.c1.id, disposition="destroy")
    with w.factory() as db:
        assert db.scalars(select(IdempotencyRecord)).all() == []


def test_termination_waits_for_a_running_job_and_refuses_a_bad_recipient_key(world: World) -> None:
    """A job still writing its scratch holds a lock there: termination waits for it, and when it
    has not stopped in time says so and leaves the rest for a second run (it used to go on and
    sign while the job kept rendering, on scratch it had shredded). A transfer key that is not
    an X25519 public key is refused before the contract is frozen."""
    import os

    from dataprotection.lifecycle import TerminationError, hold_scratch, scratch_in_use

    w = world
    paths = lifecycle_paths(w.settings)
    with pytest.raises(TerminationError, match=r"X25519|PEM"):
        terminate_contract(
            w.factory, w.vault, paths, contract_id=w.c1.id, disposition="transfer", recipient_public_pem=b"garbage"
        )
    with w.factory() as db:
        assert db.get(Contract, w.c1.id).state == "active"  # type: ignore[union-attr]
    with w.factory.begin() as db:
        job = db.scalars(select(Job).where(Job.project_id == w.c1.project_id)).one()
        job.state = "running"
        job_id = job.id
    scratch = w.settings.scratch_dir / job_id
    fd = hold_scratch(scratch)  # the job's process, alive
    assert scratch_in_use(scratch)
    with pytest.raises(TerminationError, match="still stopping"):
        terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy", wait_for_jobs_s=0.5)
    assert w.vault.objects(w.c1.id), "nothing was destroyed under the running job"
    with w.factory() as db:
        assert db.get(Job, job_id).state == "cancelled"  # type: ignore[union-attr]
    # A second run (the job is already cancelled) still waits for it.
    with pytest.raises(TerminationError, match="still stopping"):
        terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy", wait_for_jobs_s=0.5)
    os.close(fd)  # the job stopped (a crashed worker's lock goes the same way)
    assert not scratch_in_use(scratch)
    signed = terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="destroy")
    assert (
        not scratch.exists()
        and verify_certificate(signed, vault=w.vault, data_dir=w.settings.root, service_public_key=_service_key(w)).ok
    )
    with pytest.raises(TerminationError, match="already ended with 'destroy'"):
        terminate_contract(w.factory, w.vault, paths, contract_id=w.c1.id, disposition="return")


def test_a_returned_export_leaves_the_service_on_receipt_or_by_its_deadline(world: World, tmp_path: Path) -> None:
    """The 'return' archive holds the contract's data in clear: the operator copies it out and
    shreds it (CLI); one nobody claimed is shredded by the retention sweep on the deadline the
    certificate names; a download is never cut by a deletion; strays and partial files go too."""
    import hashlib
    import os
    import time
    from datetime import date, timedelta

    from cli.main import main
    from dataprotection.lifecycle import delete_export, expire_exports, export_file, stream_export

    w = world
    paths = lifecycle_paths(w.settings)
    certs = [
        terminate_contract(w.factory, w.vault, paths, contract_id=c.id, disposition="return") for c in (w.c1, w.c2)
    ]
    first, second = export_file(paths, w.c1.id), export_file(paths, w.c2.id)
    assert first is not None and second is not None
    # A download in progress holds off a deletion, and arrives whole.
    found = stream_export(w.factory, paths, w.c1.id, actor="t", chunk=1024)
    assert found is not None
    size, name, chunks = found
    got = [next(chunks)]
    with pytest.raises(TimeoutError):
        delete_export(w.factory, paths, w.c1.id, actor="t", why="x", wait_s=0.3)
    got += list(chunks)
    assert hashlib.sha256(b"".join(got)).hexdigest() == certs[0]["document"]["export"]["sha256"]
    assert name == f"{w.c1.id}-export.zip" and size == first.stat().st_size
    # A stray look-alike and an old partial archive: the stray is not taken for the export.
    stray = paths.exports / f"{w.c2.id}-export.zip.partial"
    stray.write_bytes(b"x")
    partial = paths.exports / ".tmp-0123456789ab"
    partial.write_bytes(b"clear data")
    old = time.time() - 2 * 86400
    os.utime(stray, (old, old))
    os.utime(partial, (old, old))
    assert expire_exports(w.factory, paths) == 0  # both fresh, by their certificates' deadlines
    assert second.exists() and not partial.exists()
    os.environ["SITEPLAN_DATA_DIR"] = str(w.settings.data_dir)
    try:
        out = tmp_path / "handed-over.zip"
        with pytest.raises(SystemExit):  # copy and delete in one go is refused (it used to only delete)
            main(["contract", "export", w.c1.id, "--out", str(out), "--delete"])
        assert first.exists()
        assert main(["contract", "export", w.c1.id, "--out", str(out)]) == 0
        assert out.read_bytes() == first.read_bytes() and (out.stat().st_mode & 0o077) == 0
        assert not (tmp_path / ".handed-over.zip.tmp").exists()
        with pytest.raises(SystemExit, match="exists"):
            main(["contract", "export", w.c1.id, "--out", str(out)])
        assert main(["contract", "export", w.c1.id, "--delete"]) == 0
        assert not first.exists()
        with pytest.raises(SystemExit, match="no export archive waiting"):
            main(["contract", "export", w.c1.id, "--delete"])
        # The deadline the certificate promised has come: the retention run shreds it.
        with w.factory.begin() as db:
            c2 = db.get(Contract, w.c2.id)
            assert c2 is not None and c2.termination is not None
            t = dict(c2.termination)
            assert t["export"]["service_copy_deleted_by"] == (date.today() + timedelta(days=30)).isoformat()
            t["export"] = {**t["export"], "service_copy_deleted_by": date.today().isoformat()}
            c2.termination = t
        assert main(["retention"]) == 0
    finally:
        del os.environ["SITEPLAN_DATA_DIR"]
    assert not second.exists() and stray.exists()
    expire_exports(w.factory, paths)
    assert not list(paths.exports.glob(".*.lock")), "the next sweep removes the locks of exports gone"
    with w.factory() as db:
        entries = register.export_register(db, w.tenant_id)
        assert register.verify_register(db, w.tenant_id).ok
    by_actor = [(e["action"], e["actor"], e["ref"]) for e in entries if e["action"].startswith("export_")]
    assert by_actor == [
        ("export_downloaded", "t", w.c1.id),
        ("export_downloaded", "operator", w.c1.id),
        ("export_deleted", "operator", w.c1.id),
        ("export_deleted", "system", w.c2.id),
    ]


def test_contract_lock_maps_only_its_own_wait_to_contract_busy(tmp_path: Path) -> None:
    """A busy lock is ContractBusy; a TimeoutError raised by the holder's own work (a database
    or socket timeout) stays what it is, and the lock is released either way."""
    dirs = DataDir(root=tmp_path, keys=tmp_path / "keys")
    with contract_lock(dirs, "c1"), pytest.raises(ContractBusy), contract_shared(dirs, "c1", wait_s=0.1):
        pass
    for lock in (contract_lock, contract_shared):
        with pytest.raises(TimeoutError) as raised, lock(dirs, "c1"):
            raise TimeoutError("the holder's own")
        assert not isinstance(raised.value, ContractBusy)
    with contract_lock(dirs, "c1", wait_s=0.1):
        pass
