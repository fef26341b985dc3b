"""Contract termination (P8): export (return or transfer), destruction, and a signed certificate.

``terminate_contract`` is resumable: each step records its result in ``contracts.termination``
before the next starts, so a run killed at any point is finished by running it again, and no
step leaves a readable copy behind:

1. ``freeze``    the contract goes to ``terminating`` (no new work), queued and running jobs are
                 cancelled, and running ones are waited for (their scratch disappears);
2. ``export``    for ``return``/``transfer``: a self-describing archive (photos, plans, designs,
                 subject records, the register, a manifest of SHA-256 hashes); for ``transfer``
                 encrypted to the receiving processor's X25519 public key;
3. ``inventory`` every vault object, upload in progress and scratch file of the contract is
                 listed with the SHA-256 of its bytes (the certificate names them by hash);
4. ``rows``      its rows are deleted (subjects, projects, photos, designs, jobs, plan files);
5. ``objects``   its objects, uploads and scratch are shredded;
6. ``key``       its data key is destroyed (crypto-shredding: copies in backups die with it);
7. ``close``     billing records get their 7-year deletion date, the register records the end,
                 and the certificate is signed with the service's Ed25519 key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dataprotection import register, signing
from dataprotection.fields import design_descriptor, open_reference
from dataprotection.rights import delete_contract_rows
from dataprotection.subjects import open_subject
from dataprotection.vault import Vault, contract_lock_path, file_lock, shred_file
from siteplan.db import (
    BillingRecord,
    Certificate,
    Contract,
    Design,
    Job,
    Photo,
    PlanFile,
    Project,
    Subject,
)
from siteplan.files import write_atomic
from siteplan.settings import DataDir
from siteplan.states import ContractState, JobState, PhotoState

log = logging.getLogger(__name__)

DISPOSITIONS = ("destroy", "return", "transfer")
STEPS = ("freeze", "export", "inventory", "rows", "objects", "key", "close")
EXPORT_KEEP_DAYS = 30  # an export archive waits this long for the controller, then is shredded
BILLING_RETENTION = timedelta(days=7 * 365 + 2)  # 7 years (P10), leap days included


class TerminationError(RuntimeError):
    """Termination cannot proceed as asked (the message says why)."""


class ContractBusy(TerminationError):
    """Another termination or erasure of this contract holds its lock: nothing was done."""


# How long termination and erasure wait for the contract's lock: an upload holds it (shared) only
# while it writes one batch, so this is a wait for a few writes, never for a whole upload.
CONTRACT_LOCK_WAIT_S = 30.0


@contextlib.contextmanager
def contract_lock(paths: Paths, contract_id: str, *, wait_s: float = CONTRACT_LOCK_WAIT_S) -> Iterator[None]:
    """The contract's data lock, exclusive: termination, erasure and the sweeps. ContractBusy
    when it cannot be had within ``wait_s``."""
    with contextlib.ExitStack() as held:
        try:
            fd = held.enter_context(_contract_file_lock(paths, contract_id, exclusive=True, wait_s=wait_s))
        except TimeoutError:
            raise ContractBusy(
                "another termination, erasure or sweep of this contract is running; retry shortly"
            ) from None
        bump_generation(fd)
        yield


@contextlib.contextmanager
def contract_shared(paths: Paths, contract_id: str, *, wait_s: float = CONTRACT_LOCK_WAIT_S) -> Iterator[None]:
    """The contract's data lock, shared: one short write of the contract's data (a design's file
    or an anonymised photo into the vault). The writer checks its row again inside: a
    termination or an erasure that held the lock before it may have deleted it."""
    # A TimeoutError the caller's block raises is its own, not the lock's: only taking the lock
    # is mapped to ContractBusy.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(_contract_file_lock(paths, contract_id, exclusive=False, wait_s=wait_s))
        except TimeoutError:
            raise ContractBusy("the contract's data is being changed; retry shortly") from None
        yield


def _contract_file_lock(
    paths: Paths, contract_id: str, *, exclusive: bool, wait_s: float
) -> contextlib.AbstractContextManager[int]:
    return file_lock(contract_lock_path(paths.lock_dir, contract_id), exclusive=exclusive, wait_s=wait_s, poll_s=0.05)


def bump_generation(fd: int) -> None:
    """Count one more exclusive holder in the lock file itself (a decimal number): a writer
    holding the lock shared reads it to know whether anyone could have deleted its upload since
    it last looked (api.uploads.writing), without a database read per write."""
    try:
        n = int(os.pread(fd, 32, 0).decode() or 0)
    except ValueError:
        n = 0
    data = str(n + 1).encode()
    os.pwrite(fd, data.ljust(32), 0)


@contextlib.contextmanager
def termination_lock(paths: Paths, contract_id: str) -> Iterator[None]:
    """One termination of a contract at a time: a second one (a double click, the API and the
    CLI) is refused at once with ContractBusy and runs none of the steps."""
    path = paths.lock_dir / f"terminate-{contract_id}.lock"
    try:
        with file_lock(path, exclusive=True, wait_s=0.0):
            yield
    except TimeoutError:
        raise ContractBusy("a termination of this contract is already running; wait for it to finish") from None


class InvalidRecipientKey(TerminationError):
    """The receiving processor's key for a transfer is not an X25519 public key in PEM."""


def recipient_key(pem: bytes) -> X25519PublicKey:
    """The receiving processor's public key, checked before anything is frozen or exported."""
    try:
        pub = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidRecipientKey("the receiving processor's key is not a PEM public key") from None
    if not isinstance(pub, X25519PublicKey):
        raise InvalidRecipientKey("the receiving processor's key must be an X25519 public key (PEM)")
    return pub


# Where the contract's data can be, besides the vault: the data dir's folders (one definition).
Paths = DataDir


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state(factory: sessionmaker[Session], contract_id: str) -> dict[str, Any]:
    with factory() as db:
        c = db.get(Contract, contract_id)
        if c is None:
            raise TerminationError("no such contract")
        return dict(c.termination or {})


def _save(factory: sessionmaker[Session], contract_id: str, **changes: Any) -> dict[str, Any]:
    with factory.begin() as db:
        c = db.get(Contract, contract_id)
        assert c is not None
        t = dict(c.termination or {})
        t.update(changes)
        c.termination = t
        return t


def _done(factory: sessionmaker[Session], contract_id: str, step: str, **changes: Any) -> None:
    t = _state(factory, contract_id)
    _save(factory, contract_id, steps=[*t.get("steps", []), step], **changes)


RUNNING_MARK = ".running"


def hold_scratch(scratch: Path) -> int:
    """Create the job's scratch directory and hold a lock in it for as long as the job runs.
    The lock goes with the process, so a termination can tell a job still writing there from
    a directory a crashed worker left (``scratch_in_use``)."""
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(scratch / RUNNING_MARK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def scratch_in_use(scratch: Path) -> bool:
    """Whether a live job holds this scratch directory (see hold_scratch)."""
    try:
        fd = os.open(scratch / RUNNING_MARK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return False


def shred_scratch(scratch: Path) -> int:
    """Remove a job's scratch directory that no live job holds (a crashed worker's): the
    decrypted photos, the design (its file and descriptor, which carries its name) and the SfM
    database are overwritten first, the rest (derived models, renders) unlinked. Returns how
    many files were shredded; 0 and nothing touched when a live job holds it."""
    if not scratch.is_dir() or scratch_in_use(scratch):
        return 0
    n = 0
    for p in sorted(scratch.rglob("*")):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                rel = p.relative_to(scratch).parts
                if rel[0] in ("photos", "design") or p.suffix in (".db", ".json", ".jpg", ".png"):
                    n += shred_file(p)
    shutil.rmtree(scratch, ignore_errors=True)
    return n


# -- export archives ----------------------------------------------------------------------------


def _export_zip(db: Session, vault: Vault, contract: Contract) -> bytes:
    """Everything of one contract, decrypted, with a manifest of SHA-256 hashes. Held in memory
    (one contract's photos: tens of MB); a streaming zip is the upgrade for very large ones."""
    files: list[dict[str, Any]] = []
    buf = io.BytesIO()
    cid = contract.id
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:

        def add(name: str, data: bytes) -> None:
            z.writestr(name, data)
            files.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

        subjects = db.scalars(select(Subject).where(Subject.contract_id == cid)).all()
        for s in subjects:
            f = open_subject(vault.keys, cid, s.id, s.name_enc, s.address_enc, s.phone_enc)
            rec = {"id": s.id, "name": f.name, "address": f.address, "phone": f.phone, "restricted": s.restricted}
            add(f"subjects/{s.id}.json", json.dumps(rec, indent=1, ensure_ascii=False).encode())
        for p in db.scalars(select(Project).where(Project.contract_id == cid)).all():
            add(
                f"projects/{p.id}/project.json",
                json.dumps(
                    {"id": p.id, "reference": open_reference(vault.keys, p), "subject_id": p.subject_id}
                ).encode(),
            )
            anonymised = select(Photo).where(Photo.project_id == p.id, Photo.state == PhotoState.ANONYMISED)
            for ph in db.scalars(anonymised).all():
                assert ph.object is not None
                add(f"projects/{p.id}/photos/{ph.id}.jpg", vault.read_bytes(cid, ph.object))
            for d in db.scalars(select(Design).where(Design.project_id == p.id)).all():
                add(f"projects/{p.id}/designs/{d.id}.json", json.dumps(design_descriptor(vault.keys, d)).encode())
                if d.object:
                    add(f"projects/{p.id}/designs/{d.id}.{d.file_format}", vault.read_bytes(cid, d.object))
            for j in db.scalars(select(Job).where(Job.project_id == p.id, Job.state == JobState.DONE)).all():
                for pf in db.scalars(select(PlanFile).where(PlanFile.job_id == j.id)).all():
                    add(f"projects/{p.id}/plans/{j.id}/{pf.name}", vault.read_bytes(cid, pf.object))
        add("register.json", json.dumps(register.export_register(db, contract.tenant_id), indent=1).encode())
        manifest = {
            "format": "siteplan.export/v1",
            "controller": contract.tenant_id,
            "contract": cid,
            "created_at": datetime.now(UTC).isoformat(),
            "files": files,
        }
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
    return buf.getvalue()


_TRANSFER_MAGIC = b"SPX1"


def encrypt_for(recipient_public_pem: bytes, data: bytes) -> bytes:
    """Seal ``data`` to an X25519 public key: ephemeral ECDH, HKDF-SHA256, AES-256-GCM."""
    pub = recipient_key(recipient_public_pem)
    eph = X25519PrivateKey.generate()
    eph_raw = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = HKDF(hashes.SHA256(), 32, salt=eph_raw, info=b"siteplan-transfer/v1").derive(eph.exchange(pub))
    nonce = secrets.token_bytes(12)
    return _TRANSFER_MAGIC + eph_raw + nonce + AESGCM(key).encrypt(nonce, data, _TRANSFER_MAGIC + eph_raw)


def decrypt_transfer(recipient_private_pem: bytes, blob: bytes) -> bytes:
    """What the receiving processor runs (or any X25519 + HKDF + AES-GCM implementation)."""
    priv = serialization.load_pem_private_key(recipient_private_pem, password=None)
    if not isinstance(priv, X25519PrivateKey) or blob[:4] != _TRANSFER_MAGIC:
        raise TerminationError("not a Siteplan transfer archive, or not an X25519 key")
    eph_raw, nonce, ct = blob[4:36], blob[36:48], blob[48:]
    shared = priv.exchange(X25519PublicKey.from_public_bytes(eph_raw))
    key = HKDF(hashes.SHA256(), 32, salt=eph_raw, info=b"siteplan-transfer/v1").derive(shared)
    return AESGCM(key).decrypt(nonce, ct, _TRANSFER_MAGIC + eph_raw)


def _write_atomic(path: Path, data: bytes) -> None:
    """Owner-only (an export holds the contract's data in clear), whole or not at all."""
    write_atomic(path, data)


# -- the termination ------------------------------------------------------------------------------


EXPORT_SUFFIXES = (".zip", ".zip.x25519")


def export_file(paths: Paths, contract_id: str) -> Path | None:
    """The export archive a ``return`` or ``transfer`` termination left for the controller."""
    for suffix in EXPORT_SUFFIXES:
        p = paths.exports / f"{contract_id}-export{suffix}"
        if p.is_file():
            return p
    return None


@contextlib.contextmanager
def export_lock(paths: Paths, contract_id: str, *, shared: bool, wait_s: float = 30.0) -> Iterator[None]:
    """Readers (downloads) share it, a deletion holds it alone: a download never streams bytes
    being shredded, and two deletions (a double click, two server processes' sweeps) never both
    record one. Raises TimeoutError when it cannot be had within ``wait_s``."""
    with file_lock(paths.exports / f".{contract_id}.lock", exclusive=not shared, wait_s=wait_s, poll_s=0.1):
        yield


def _record_export(db: Session, contract_id: str, *, actor: str, action: str, purpose: str) -> None:
    c = db.get(Contract, contract_id)
    if c is not None:  # an export whose contract row is gone (restored elsewhere) still goes
        register.record(
            db,
            tenant_id=c.tenant_id,
            actor=actor,
            action=action,
            categories=list(_EXPORT_CATEGORIES),
            purpose=purpose,
            ref=contract_id,
        )


class _ExportStream:
    """The chunks of one download, holding the shared lock until the last is read or the stream
    is dropped (a client gone before the first byte must not keep deletions waiting)."""

    def __init__(self, f: Any, lock: contextlib.AbstractContextManager[None], done: Callable[[], None], chunk: int):
        self._f, self._lock, self._done, self._chunk = f, lock, done, chunk
        self._size = os.fstat(f.fileno()).st_size
        self._sent = 0
        self._closed = False

    def __iter__(self) -> _ExportStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        block = self._f.read(self._chunk)
        if not block:
            if self._sent == self._size:
                self._done()
            self.close()
            raise StopIteration
        self._sent += len(block)
        return bytes(block)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._f.close()
            self._lock.__exit__(None, None, None)

    def __del__(self) -> None:
        self.close()


def stream_export(
    factory: sessionmaker[Session], paths: Paths, contract_id: str, *, actor: str, chunk: int = 1 << 20
) -> tuple[int, str, Iterator[bytes]] | None:
    """(size, file name, chunks) of the export for a download, or None when there is none. The
    register records the download once the last byte was read; a deletion waits until then."""
    lock = export_lock(paths, contract_id, shared=True)
    lock.__enter__()
    p = export_file(paths, contract_id)
    if p is None:
        lock.__exit__(None, None, None)
        return None

    def done() -> None:
        with factory.begin() as db:
            purpose = "end of service: the controller fetched its export"
            _record_export(db, contract_id, actor=actor, action="export_downloaded", purpose=purpose)

    stream = _ExportStream(p.open("rb"), lock, done, chunk)
    return stream._size, p.name, stream


def delete_export(
    factory: sessionmaker[Session], paths: Paths, contract_id: str, *, actor: str, why: str, wait_s: float = 30.0
) -> bool:
    """Shred the service's copy of a contract's export (received, or past its deadline) and
    record it; False when there is none. The certificate promised this deletion. Waits up to
    ``wait_s`` for downloads under way (TimeoutError after)."""
    with export_lock(paths, contract_id, shared=False, wait_s=wait_s):
        p = export_file(paths, contract_id)
        if p is None:
            return False
        with factory.begin() as db:
            _record_export(db, contract_id, actor=actor, action="export_deleted", purpose=why)
            shred_file(p)
    log.info("export of contract %s shredded (%s)", contract_id[:8], why)
    return True


def export_deadline(factory: sessionmaker[Session], p: Path, contract_id: str, keep_days: int) -> date:
    """The date the certificate promised (its termination record), else the file's age."""
    with factory() as db:
        c = db.get(Contract, contract_id)
        promised = ((c.termination or {}).get("export") or {}).get("service_copy_deleted_by") if c else None
    if promised:
        return date.fromisoformat(promised)
    return date.fromtimestamp(p.stat().st_mtime) + timedelta(days=keep_days)


def expire_exports(factory: sessionmaker[Session], paths: Paths, *, keep_days: int = EXPORT_KEEP_DAYS) -> int:
    """Shred the export archives whose deadline has come (nobody confirmed receipt), and
    temporary files a killed export left; the count of archives."""
    if not paths.exports.is_dir():
        return 0
    n = 0
    today = date.today()
    for p in sorted(paths.exports.iterdir()):
        if p.name.startswith(".tmp-") and p.stat().st_mtime < time.time() - 86400:
            shred_file(p)  # a whole archive in clear, from a termination killed before its rename
            continue
        if p.name.startswith(".") and p.name.endswith(".lock"):
            if export_file(paths, p.name[1:-5]) is None:  # its export is gone for good: so is its use
                p.unlink(missing_ok=True)
            continue
        cid = next((p.name.removesuffix(f"-export{x}") for x in EXPORT_SUFFIXES if p.name.endswith(f"-export{x}")), "")
        if not cid or export_file(paths, cid) != p:
            continue
        if today >= export_deadline(factory, p, cid, keep_days):
            why = "end of service: export not confirmed by its deadline, deleted"
            try:
                n += delete_export(factory, paths, cid, actor="system", why=why)
            except TimeoutError:
                continue  # being downloaded: the next sweep takes it
    return n


_EXPORT_CATEGORIES = ("photos", "derived_media", "site_models", "subject_identity", "subject_contact")


def terminate_contract(
    factory: sessionmaker[Session],
    vault: Vault,
    paths: Paths,
    *,
    contract_id: str,
    disposition: str,
    actor: str = "system",
    recipient_public_pem: bytes | None = None,
    wait_for_jobs_s: float = 120.0,
    checkpoint: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a termination; returns the signed certificate. Takes the contract's
    termination lock (a second termination: ContractBusy), then its data lock, so no upload,
    erasure or sweep writes the contract's data while the steps run."""
    if disposition not in DISPOSITIONS:
        raise TerminationError(f"disposition must be one of {', '.join(DISPOSITIONS)}")
    if disposition == "transfer":
        if recipient_public_pem is None:
            raise TerminationError("a transfer needs the receiving processor's public key")
        recipient_key(recipient_public_pem)  # a bad key is refused before the contract is frozen
    hook = checkpoint or (lambda _step: None)
    with factory() as db:
        if db.get(Contract, contract_id) is None:
            raise TerminationError("no such contract")
    with termination_lock(paths, contract_id), contract_lock(paths, contract_id):
        return _terminate(
            factory,
            vault,
            paths,
            contract_id=contract_id,
            disposition=disposition,
            actor=actor,
            recipient_public_pem=recipient_public_pem,
            wait_for_jobs_s=wait_for_jobs_s,
            hook=hook,
        )


@dataclass(frozen=True)
class _Run:
    """One attempt of a termination: what its steps need."""

    factory: sessionmaker[Session]
    vault: Vault
    paths: Paths
    contract_id: str
    disposition: str
    actor: str
    recipient_public_pem: bytes | None
    wait_for_jobs_s: float
    tenant_id: str


def _terminate(
    factory: sessionmaker[Session],
    vault: Vault,
    paths: Paths,
    *,
    contract_id: str,
    disposition: str,
    actor: str,
    recipient_public_pem: bytes | None,
    wait_for_jobs_s: float,
    hook: Callable[[str], None],
) -> dict[str, Any]:
    """The steps in order, each run once across attempts (the contract's ``termination`` says
    which are done), ``hook`` called after each; then the close, which signs the certificate."""
    begun = _begin(factory, paths, contract_id=contract_id, disposition=disposition)
    if isinstance(begun, dict):  # ended already: its certificate
        return begun
    run = _Run(factory, vault, paths, contract_id, disposition, actor, recipient_public_pem, wait_for_jobs_s, begun)
    for name, step in _STEPS:
        if name not in _state(factory, contract_id)["steps"]:
            step(run)
        hook(name)
    return _close(run)


def _begin(factory: sessionmaker[Session], paths: Paths, *, contract_id: str, disposition: str) -> dict[str, Any] | str:
    """Mark the contract terminating (or find it ended: its certificate, written again if the
    file is missing); returns the certificate, or the controller's id for the steps."""
    with factory.begin() as db:
        c = db.get(Contract, contract_id)
        if c is None:
            raise TerminationError("no such contract")
        if c.state == ContractState.ENDED:
            if c.disposition and c.disposition != disposition:
                raise TerminationError(
                    f"the contract has already ended with '{c.disposition}'; nothing is left to {disposition}"
                )
            cert = db.scalars(select(Certificate).where(Certificate.contract_id == contract_id)).first()
            if cert is None:
                raise TerminationError("the contract ended without a certificate")
            signed_before = dict(cert.document)
            # A kill between the commit and the file write leaves no file: write it again.
            if not (paths.certificates / f"destruction-{contract_id}.json").exists():
                write_certificate(paths.certificates, signed_before)
            return signed_before
        if c.state == ContractState.TERMINATING and c.disposition != disposition:
            raise TerminationError(f"a '{c.disposition}' termination is under way; finish it with that disposition")
        c.state, c.disposition = ContractState.TERMINATING, disposition
        tenant_id = c.tenant_id
        t = dict(c.termination or {})
        t.setdefault("steps", [])
        t.setdefault("started_at", datetime.now(UTC).isoformat())
        c.termination = t
    return tenant_id


def _step_freeze(run: _Run) -> None:
    """Step 1, freeze: the contract's jobs cancelled and waited for until their scratch is released."""
    factory, paths, contract_id = run.factory, run.paths, run.contract_id
    wait_for_jobs_s = run.wait_for_jobs_s
    with factory.begin() as db:
        projects = select(Project.id).where(Project.contract_id == contract_id)
        jobs = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects))))
        not_final = (JobState.QUEUED, JobState.RUNNING)
        live_jobs = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects), Job.state.in_(not_final))))
        stop = update(Job).where(Job.id.in_(live_jobs))
        db.execute(stop.values(state=JobState.CANCELLED, error="the contract ended"))
        # Which jobs this termination stopped, in the same transaction as stopping them: a
        # resumed attempt (the first one crashed or timed out) adds to the list, so the
        # certificate counts what the whole termination did.
        ct = db.get(Contract, contract_id)
        assert ct is not None
        tt = dict(ct.termination or {})
        tt["cancelled_jobs"] = sorted({*tt.get("cancelled_jobs", []), *live_jobs})
        ct.termination = tt
        n = len(tt["cancelled_jobs"])
    # Every job of the contract, not only those running now: a resumed termination (the
    # first run cancelled them) must wait for them too. A cancelled job notices within a
    # second, kills its stage's task and wipes its scratch; a directory no live job holds
    # (a crashed worker's) is shredded with the rest in step 5.
    deadline = time.monotonic() + wait_for_jobs_s
    while (live := [j for j in jobs if scratch_in_use(paths.scratch / j)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if live:
        _save(factory, contract_id, jobs_cancelled=n)
        raise TerminationError(
            f"{len(live)} job(s) of this contract are still stopping; run the termination again to finish it"
        )
    _done(factory, contract_id, "freeze", jobs_cancelled=n)


def _step_export(run: _Run) -> None:
    """Step 2, export: the archive for a return or a transfer (sealed to the recipient's key)."""
    factory, vault, paths, contract_id = run.factory, run.vault, run.paths, run.contract_id
    disposition, recipient_public_pem = run.disposition, run.recipient_public_pem
    export: dict[str, Any] | None = None
    if disposition in ("return", "transfer"):
        with factory() as db:
            c = db.get(Contract, contract_id)
            assert c is not None
            data = _export_zip(db, vault, c)
        name = f"{contract_id}-export.zip"
        if disposition == "transfer":
            assert recipient_public_pem is not None
            data = encrypt_for(recipient_public_pem, data)
            name += ".x25519"
        dest = paths.exports / name
        _write_atomic(dest, data)
        export = {
            "file": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            # The service's copy goes when the controller confirms receipt, or at this date.
            "service_copy_deleted_by": (date.today() + timedelta(days=EXPORT_KEEP_DAYS)).isoformat(),
        }
        if disposition == "transfer":
            assert recipient_public_pem is not None
            pub = recipient_key(recipient_public_pem)
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            export["recipient_key_fingerprint"] = "SHA256:" + hashlib.sha256(raw).hexdigest()[:32]
    _done(factory, contract_id, "export", export=export)


def _step_inventory(run: _Run) -> None:
    """Step 3, inventory: name every copy by the hash of its bytes, before anything is destroyed."""
    factory, vault, paths, contract_id = run.factory, run.vault, run.paths, run.contract_id
    objects = {oid: _sha256_file(vault.object_path(contract_id, oid)) for oid in vault.objects(contract_id)}
    uploads = (
        sorted(str(p.relative_to(paths.uploads)) for p in (paths.uploads / contract_id).rglob("*") if p.is_file())
        if (paths.uploads / contract_id).exists()
        else []
    )
    with factory() as db:
        projects = select(Project.id).where(Project.contract_id == contract_id)
        jobs = list(db.scalars(select(Job.id).where(Job.project_id.in_(projects))))
    _done(factory, contract_id, "inventory", objects=objects, uploads=uploads, jobs=jobs)


def _step_rows(run: _Run) -> None:
    """Step 4, rows: the contract's database rows deleted."""
    factory, contract_id = run.factory, run.contract_id
    with factory.begin() as db:
        counts = delete_contract_rows(db, contract_id)
    _done(factory, contract_id, "rows", rows=counts)


def _step_objects(run: _Run) -> None:
    """Step 5, objects: the vault container, uploads in progress and worker scratch shredded."""
    factory, vault, paths, contract_id = run.factory, run.vault, run.paths, run.contract_id
    st = _state(factory, contract_id)
    shredded = vault.drop_container(contract_id)
    up = paths.uploads / contract_id
    for p in sorted(up.rglob("*")) if up.exists() else []:
        if p.is_file():
            shred_file(p)
    shutil.rmtree(up, ignore_errors=True)
    scratch_files = 0
    for j in st.get("jobs", []):
        d = paths.scratch / j
        if d.exists():
            for p in d.rglob("*"):
                if p.is_file():
                    scratch_files += shred_file(p)
            shutil.rmtree(d, ignore_errors=True)
    _done(factory, contract_id, "objects", shredded=st.get("shredded", 0) + shredded, scratch_files=scratch_files)


def _step_key(run: _Run) -> None:
    """Step 6, key: the contract's data key destroyed (crypto-shredding every copy)."""
    factory, vault, contract_id = run.factory, run.vault, run.contract_id
    vault.keys.destroy(contract_id)
    if vault.keys.exists(contract_id):
        raise TerminationError("the data key could not be destroyed")
    _done(factory, contract_id, "key", key_destroyed_at=datetime.now(UTC).isoformat())


_STEPS: tuple[tuple[str, Callable[[_Run], None]], ...] = (
    ("freeze", _step_freeze),
    ("export", _step_export),
    ("inventory", _step_inventory),
    ("rows", _step_rows),
    ("objects", _step_objects),
    ("key", _step_key),
)


def _close(run: _Run) -> dict[str, Any]:
    """Step 7, close: billing retention, register, certificate, state."""
    factory, paths, contract_id = run.factory, run.paths, run.contract_id
    disposition, actor, tenant_id = run.disposition, run.actor, run.tenant_id
    st = _state(factory, contract_id)
    today = date.today()
    with factory.begin() as db:
        db.execute(
            update(BillingRecord)
            .where(BillingRecord.contract_id == contract_id, BillingRecord.file_closed_on.is_(None))
            .values(file_closed_on=today, delete_after=today + BILLING_RETENTION)
        )
        entry = register.record(
            db,
            tenant_id=tenant_id,
            actor=actor,
            action="contract_terminated",
            categories=list(_EXPORT_CATEGORIES),
            purpose=f"end of service: {disposition}",
            ref=contract_id,
        )
        doc = {
            "type": "siteplan.destruction-certificate/v1",
            "certificate_id": secrets.token_hex(16),
            "issued_at": datetime.now(UTC).isoformat(),
            "controller": tenant_id,
            "contract": contract_id,
            "disposition": disposition,
            "export": st.get("export"),
            "jobs_cancelled": st.get("jobs_cancelled", 0),
            "destroyed": {
                "objects": len(st.get("objects", {})),
                "object_sha256": sorted(st.get("objects", {}).values()),
                "object_ids": sorted(st.get("objects", {})),
                "uploads_in_progress_files": len(st.get("uploads", [])),
                "scratch_files": st.get("scratch_files", 0),
                "rows": st.get("rows", {}),
            },
            "key_destruction": {
                "key_id": contract_id,
                "destroyed_at": st.get("key_destroyed_at"),
                "method": "data key (AES-256) overwritten and unlinked from the key store; every object and "
                "backup copy sealed with it is unreadable (crypto-shredding)",
            },
            "register_head": {"seq": entry.seq, "hash": entry.hash},
            "retained": "billing records only (not media), deleted 7 years after the file is closed",
        }
        signed = signing.sign(signing.load_or_create(paths.signing_key), doc)
        db.add(Certificate(tenant_id=tenant_id, contract_id=contract_id, document=signed))
        c = db.get(Contract, contract_id)
        assert c is not None
        c.state, c.ends_on = ContractState.ENDED, today
        t2 = dict(c.termination or {})
        t2["steps"] = [*t2.get("steps", []), "close"]
        c.termination = t2
    write_certificate(paths.certificates, signed)
    log.info("contract %s ended (%s): %d objects destroyed", contract_id[:8], disposition, len(st.get("objects", {})))
    return signed


def write_certificate(directory: Path, signed: dict[str, Any]) -> tuple[Path, Path]:
    """The signed JSON and a human-readable HTML rendering of it."""
    from html import escape

    doc = signed["document"]
    base = directory / f"destruction-{doc['contract']}"
    _write_atomic(base.with_suffix(".json"), json.dumps(signed, indent=1).encode())
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in doc["destroyed"]["rows"].items())
    export = doc.get("export")
    export_line = ""
    if export:
        to = "the receiving processor (sealed to its key)" if doc["disposition"] == "transfer" else "the controller"
        export_line = (
            f"<p>Before destruction an export archive was made for {to} "
            f"(SHA-256 <code>{escape(export['sha256'])}</code>). The service deletes its copy when the "
            "controller confirms receipt, and at the latest on "
            f"{escape(str(export.get('service_copy_deleted_by', 'its deadline')))}; the register records "
            "the download and the deletion.</p>"
        )
    html = f"""<!doctype html><meta charset="utf-8"><title>Destruction certificate</title>
<style>body{{font:15px system-ui;max-width:760px;margin:2em auto}}td{{padding:2px 10px}}code{{font-size:12px}}</style>
<h1>Certificate of destruction</h1>
<p>Contract <code>{escape(doc["contract"])}</code> of controller <code>{escape(doc["controller"])}</code>
ended on {escape(doc["issued_at"])} with disposition <b>{escape(doc["disposition"])}</b>.</p>
<p>{doc["destroyed"]["objects"]} stored objects (originals, anonymised photos, designs, models, drawings,
montages) were shredded, {doc["destroyed"]["uploads_in_progress_files"]} files of unfinished uploads and
{doc["destroyed"]["scratch_files"]} worker scratch files removed, and these database rows deleted:</p>
<table>{rows}</table>
<p>The contract's data key was destroyed at {escape(str(doc["key_destruction"]["destroyed_at"]))}: every copy
of its data, including copies in backups, can no longer be decrypted.</p>
{export_line}
<p>Kept: {escape(doc["retained"])}.</p>
<p>Signed with the service's Ed25519 key {escape(signed["signature"]["key_fingerprint"])}. Verify with
<code>siteplan certificate verify {escape(base.with_suffix(".json").name)}</code>.</p>
"""
    _write_atomic(base.with_suffix(".html"), html.encode())
    return base.with_suffix(".json"), base.with_suffix(".html")


@dataclass(frozen=True)
class CertificateCheck:
    signature_ok: bool
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.signature_ok and not self.problems


def verify_certificate(
    signed: dict[str, Any],
    *,
    vault: Vault | None = None,
    data_dir: Path | None = None,
    service_public_key: str | None = None,
    fingerprint: str | None = None,
) -> CertificateCheck:
    """The signature, and who made it; and, where the data dir is at hand, that nothing listed
    still exists.

    A signature only proves something against a key the verifier trusts: the service's own
    (``service_public_key``, on the server) or the fingerprint the operator publishes
    (``fingerprint``). With neither, anyone's key would do (a forged certificate signed with a
    fresh key verified as valid), so the check fails and says what to pass."""
    ok = signing.verify(signed)
    problems: list[str] = []
    if not ok:
        return CertificateCheck(False, ["the signature does not match the document"])
    doc = signed["document"]
    signer = signing.fingerprint(signed["signature"]["public_key"])
    if service_public_key is not None and signed["signature"]["public_key"] != service_public_key:
        problems.append("signed by a key that is not this service's")
    if fingerprint is not None and signer.lower() != fingerprint.strip().lower():
        problems.append(f"signed by key {signer}, not by the key {fingerprint.strip()} you trust")
    if service_public_key is None and fingerprint is None:
        problems.append(
            f"the signer ({signer}) is not checked: pass the fingerprint the operator publishes (--fingerprint)"
        )
    if vault is not None:
        cid = doc["contract"]
        if vault.keys.exists(cid):
            problems.append("the contract's data key still exists")
        for oid in doc["destroyed"]["object_ids"]:
            if vault.exists(cid, oid):
                problems.append(f"object {oid} still exists")
    if data_dir is not None and data_dir.exists():
        wanted = set(doc["destroyed"]["object_sha256"])
        for p in data_dir.rglob("*"):
            if p.is_file() and p.stat().st_size > 8 and _sha256_file(p) in wanted:
                problems.append(f"a destroyed object's bytes survive in {p.relative_to(data_dir)}")
    return CertificateCheck(True, problems)
