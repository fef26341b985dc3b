"""The vault: every stored personal object encrypted at rest, with one data key per contract.

- Objects are sealed with AES-256-GCM, chunk by chunk (the STREAM idea of Hoang et al., 2015):
  the plaintext is cut into 256 KiB chunks, each sealed under a fresh random nonce with the
  object id, the chunk index and a last-chunk flag as associated data. A reordered, swapped,
  dropped or truncated chunk fails authentication, and an object is written and read without
  ever being whole in memory.
- Data keys are per (controller, contract) and are wrapped by a master key held by a
  :class:`KeyStore` (a file key in the embedded default; a KMS in production). Destroying a
  contract's key makes every copy of its objects unreadable, backups included
  (crypto-shredding), as long as the key store itself is kept out of backups (docs/vault.md).
- Object names are random: they carry no file name, no subject and no contract detail.
- Uploads in progress are kept encrypted too: full chunks are sealed as they arrive, in the final
  object format, and the unfinished tail is re-sealed under a fresh nonce at the end of each
  request. Completing an upload seals the tail as the last chunk and renames the file into the
  vault: nothing is decrypted or copied.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from siteplan.files import write_atomic

log = logging.getLogger(__name__)

MAGIC = b"SPV2"
CHUNK = 256 * 1024  # plaintext per sealed chunk: bounds memory per stream; 28 bytes of overhead each
_TAG = 16
_RECORD = 12 + CHUNK + _TAG  # one sealed full chunk: nonce, ciphertext, tag
_HEADER = struct.Struct(">4sI")  # magic, chunk size


class VaultError(Exception):
    """A vault object or key is missing, or failed authentication."""


class KeyDestroyed(VaultError):
    """The data key was destroyed (contract ended): its objects can never be read again."""


class KeyStore(Protocol):
    """Holds data keys, wrapped by a master key it never reveals. Swap for a KMS in production."""

    def create(self, key_id: str) -> None: ...
    def get(self, key_id: str) -> bytes: ...
    def destroy(self, key_id: str) -> bool: ...
    def exists(self, key_id: str) -> bool: ...


def _check_id(value: str) -> str:
    # Ids are our own hex uuids; refusing anything else keeps every path inside the vault.
    if not value or not all(c in "0123456789abcdefghijklmnopqrstuvwxyz-" for c in value) or len(value) > 64:
        raise VaultError("invalid object or key id")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data)
    _fsync_dir(path.parent)


def shred_file(path: Path) -> bool:
    """Overwrite a file with random bytes, then unlink it. On copy-on-write or flash storage the
    overwrite is best effort; what makes destruction certain is the key (crypto-shredding)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with open(path, "r+b") as f:
        left = size
        while left > 0:
            n = min(left, CHUNK)
            f.write(secrets.token_bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    return True


class FileKeyStore:
    """Embedded default: a 256-bit master key in a 0600 file, data keys wrapped by it, one file each."""

    def __init__(self, root: Path, master_key_file: Path | None = None) -> None:
        self.root = root
        self.master_file = master_key_file or root / "master.key"
        self._master: bytes | None = None

    def _aead(self) -> AESGCM:
        if self._master is None:
            if not self.master_file.exists():
                _write_private(self.master_file, AESGCM.generate_key(bit_length=256))
                log.info("created a new master key")
            key = self.master_file.read_bytes()
            if len(key) != 32:
                raise VaultError("the master key file is damaged")
            self._master = key
        return AESGCM(self._master)

    def _path(self, key_id: str) -> Path:
        return self.root / "data" / f"{_check_id(key_id)}.key"

    def create(self, key_id: str) -> None:
        path = self._path(key_id)
        if path.exists():
            return
        nonce = secrets.token_bytes(12)
        wrapped = nonce + self._aead().encrypt(nonce, AESGCM.generate_key(bit_length=256), key_id.encode())
        _write_private(path, wrapped)

    def get(self, key_id: str) -> bytes:
        path = self._path(key_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise KeyDestroyed("the data key does not exist (destroyed or never created)") from None
        try:
            return self._aead().decrypt(blob[:12], blob[12:], key_id.encode())
        except InvalidTag:
            raise VaultError("a data key failed authentication (wrong master key?)") from None

    def destroy(self, key_id: str) -> bool:
        done = shred_file(self._path(key_id))
        if done:
            _fsync_dir(self._path(key_id).parent)
        return done

    def exists(self, key_id: str) -> bool:
        return self._path(key_id).exists()

    def key_ids(self) -> list[str]:
        d = self.root / "data"
        return sorted(p.stem for p in d.glob("*.key")) if d.is_dir() else []


def _aad(key_id: str, object_id: str, index: int, last: bool) -> bytes:
    return f"siteplan-vault/v2/{key_id}/{object_id}/{index}/{int(last)}".encode()


def _seal(aead: AESGCM, chunk: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(12)  # random per chunk: a chunk re-sent after a crash never reuses one
    return nonce + aead.encrypt(nonce, chunk, aad)


def _write_full_record(
    f: BinaryIO, aead: AESGCM, chunk: bytes | bytearray | memoryview, aad: bytes, out: bytearray
) -> None:
    """Seal one full chunk into ``out`` (CHUNK + tag bytes, reused from chunk to chunk) and write
    the record. A new 256 KiB object per chunk cost more in page faults than the encryption
    itself (an upload: 36 -> 16 ms of CPU per 12 MB)."""
    nonce = secrets.token_bytes(12)
    aead.encrypt_into(nonce, chunk, aad, out)
    f.write(nonce)
    f.write(out)


@dataclass(frozen=True)
class ObjectInfo:
    object_id: str
    size: int
    sha256: str | None  # of the plaintext (None for a completed upload: hashing it would cost a
    # second decrypting pass; the privacy gate reads it once anyway)


class SealedWriter:
    """Writes one object, chunk by chunk, to a temporary file; :meth:`commit` renames it into place."""

    def __init__(self, vault: Vault, key_id: str, object_id: str) -> None:
        self._aead = AESGCM(vault.keys.get(key_id))
        self._key_id, self.object_id = key_id, object_id
        self._path = vault.object_path(key_id, object_id)
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = self._path.with_name(f".tmp-{object_id}-{secrets.token_hex(4)}")
        self._f: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._f.write(_HEADER.pack(MAGIC, CHUNK))
        self._buf = bytearray()
        self._out = bytearray(CHUNK + _TAG)
        self._n = 0
        self._size = 0
        self._hash = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        self._size += len(data)
        self._hash.update(data)
        if len(self._buf) <= CHUNK:  # keep at least one byte back: the last chunk is flagged
            return
        view = memoryview(self._buf)
        done = 0
        while len(self._buf) - done > CHUNK:
            chunk = view[done : done + CHUNK]
            _write_full_record(
                self._f, self._aead, chunk, _aad(self._key_id, self.object_id, self._n, False), self._out
            )
            chunk.release()
            done += CHUNK
            self._n += 1
        view.release()
        del self._buf[:done]

    def commit(self) -> ObjectInfo:
        self._f.write(_seal(self._aead, bytes(self._buf), _aad(self._key_id, self.object_id, self._n, True)))
        self._buf.clear()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._path)
        return ObjectInfo(self.object_id, self._size, self._hash.hexdigest())

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()


class Vault:
    """Encrypted object store on a filesystem: ``objects/<contract key>/<random id>``."""

    def __init__(self, root: Path, keys: KeyStore | None = None) -> None:
        self.root = root
        self.keys: KeyStore = keys or FileKeyStore(root.parent / "keys")

    def object_path(self, key_id: str, object_id: str) -> Path:
        return self.root / "objects" / _check_id(key_id) / _check_id(object_id)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def writer(self, key_id: str, object_id: str | None = None) -> SealedWriter:
        return SealedWriter(self, key_id, object_id or self.new_id())

    def put(self, key_id: str, data: bytes | Iterable[bytes], object_id: str | None = None) -> ObjectInfo:
        with self.writer(key_id, object_id) as w:
            for piece in [data] if isinstance(data, bytes) else data:
                w.write(piece)
            return w.commit()

    def put_file(self, key_id: str, src: Path, object_id: str | None = None) -> ObjectInfo:
        with open(src, "rb") as f:
            return self.put(key_id, iter(lambda: f.read(CHUNK), b""), object_id)

    def open(self, key_id: str, object_id: str) -> Iterator[bytes]:
        """Yield the plaintext chunk by chunk; raises :class:`VaultError` on any tampering."""
        aead = AESGCM(self.keys.get(key_id))
        path = self.object_path(key_id, object_id)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed in the generator
        except FileNotFoundError:
            raise VaultError("no such object") from None
        return _read_records(f, aead, key_id, object_id)

    def read_bytes(self, key_id: str, object_id: str) -> bytes:
        return b"".join(self.open(key_id, object_id))

    def export_to(self, key_id: str, object_id: str, dest: Path) -> None:
        """Decrypt to a file (worker scratch); written to a temporary name, then renamed."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{secrets.token_hex(6)}")
        try:
            with open(tmp, "wb") as f:
                for chunk in self.open(key_id, object_id):
                    f.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def exists(self, key_id: str, object_id: str) -> bool:
        return self.object_path(key_id, object_id).exists()

    def delete(self, key_id: str, object_id: str) -> bool:
        return shred_file(self.object_path(key_id, object_id))

    def objects(self, key_id: str) -> list[str]:
        d = self.root / "objects" / _check_id(key_id)
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def drop_container(self, key_id: str) -> int:
        """Shred every object of one contract; returns how many were removed."""
        d = self.root / "objects" / _check_id(key_id)
        n = 0
        if d.is_dir():
            for p in d.iterdir():
                n += shred_file(p)
            shutil.rmtree(d, ignore_errors=True)
        return n


def _read_records(f: BinaryIO, aead: AESGCM, key_id: str, object_id: str) -> Iterator[bytes]:
    with f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size:
            raise VaultError("object is truncated")
        magic, chunk = _HEADER.unpack(head)
        if magic != MAGIC or chunk <= 0 or chunk > 64 * 2**20:
            raise VaultError("not a vault object")
        record = 12 + chunk + _TAG
        index = 0
        cur = f.read(record)
        while True:
            nxt = f.read(record)
            last = not nxt
            try:
                yield aead.decrypt(cur[:12], cur[12:], _aad(key_id, object_id, index, last))
            except InvalidTag:
                raise VaultError("object failed authentication (tampered or truncated)") from None
            if last:
                return
            cur, index = nxt, index + 1


# -- Field-level encryption (subject names, addresses, phones) ----------------------------------


def seal_field(key: bytes, plaintext: str, *, context: str) -> str:
    """AES-GCM seal of one short field, bound to its context (table/column/row) so a ciphertext
    cannot be moved to another row or column."""
    nonce = secrets.token_bytes(12)
    ct = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), context.encode())
    return base64.urlsafe_b64encode(nonce + ct).decode("ascii")


def open_field(key: bytes, sealed: str, *, context: str) -> str:
    raw = base64.urlsafe_b64decode(sealed.encode("ascii"))
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], context.encode()).decode("utf-8")
    except InvalidTag:
        raise VaultError("an encrypted field failed authentication") from None


# -- Resumable uploads, encrypted while in progress ----------------------------------------------


def upload_staging(uploads_dir: Path, vault: Vault, contract_id: str, upload_id: str) -> UploadStaging:
    """Where an upload in progress lives: ``<uploads>/<contract>/<upload id>/``. The tus routes,
    the expiry sweep, erasure and termination all find it here."""
    return UploadStaging(uploads_dir / contract_id / upload_id, vault, contract_id, upload_id)


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool, wait_s: float = 0.0, poll_s: float = 0.02) -> Iterator[int]:
    """An flock on ``path`` (created owner-only), across threads and processes: shared or
    exclusive, waiting up to ``wait_s``; TimeoutError when it cannot be had. Yields the lock
    file's descriptor (the contract lock counts its holders in it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError("the file is locked") from None
                time.sleep(poll_s)
        yield fd
    finally:
        os.close(fd)


def contract_lock_path(locks_dir: Path, contract_id: str) -> Path:
    """The contract's data lock (docs/workers.md, "Locks"): shared by each write of an upload
    (PATCH), exclusive for termination, erasure and the sweeps, across threads and processes."""
    return locks_dir / f"contract-{_check_id(contract_id)}.lock"


def shred_upload_dir(uploads_dir: Path, contract_id: str, upload_id: str) -> int:
    """Shred what arrived of an unfinished upload without its key (it may be destroyed: the
    files are ciphertext, overwritten all the same) and its lock file. Returns files shredded."""
    d = uploads_dir / _check_id(contract_id) / _check_id(upload_id)
    n = 0
    if d.is_dir():
        for p in sorted(d.rglob("*")):
            if p.is_file() and not p.is_symlink():
                n += shred_file(p)
        shutil.rmtree(d, ignore_errors=True)
    upload_lock_path(uploads_dir, contract_id, upload_id).unlink(missing_ok=True)
    return n


def upload_lock_path(uploads_dir: Path, contract_id: str, upload_id: str) -> Path:
    """The upload's writer lock, beside its staging directory (finishing deletes that one)."""
    return uploads_dir / contract_id / f".{upload_id}.lock"


def discard_upload(uploads_dir: Path, vault: Vault, contract_id: str, upload_id: str) -> None:
    """Shred what arrived of an unfinished upload, and its lock file (no key needed)."""
    shred_upload_dir(uploads_dir, contract_id, upload_id)


class UploadStaging:
    """An upload in progress, addressed by the vault object it will become.

    ``<dir>/object`` is that object being built: the header and every full chunk, sealed exactly
    as the vault stores them. ``<dir>/tail`` holds the unfinished remainder (under one chunk),
    sealed under a fresh nonce at the end of each request and bound to the number of full chunks
    before it. The offset survives restarts; plaintext never touches the disk; completion seals
    the tail as the last chunk and renames the file into the vault.
    """

    def __init__(self, directory: Path, vault: Vault, key_id: str, object_id: str) -> None:
        self.dir = directory
        self.vault, self.key_id, self.object_id = vault, key_id, _check_id(object_id)
        self._aead = AESGCM(vault.keys.get(key_id))
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def _object(self) -> Path:
        return self.dir / "object"

    @property
    def _tail(self) -> Path:
        return self.dir / "tail"

    def _tail_aad(self, n: int) -> bytes:
        return f"siteplan-upload/v2/{self.key_id}/{self.object_id}/tail/{n}".encode()

    def _n_chunks(self) -> int:
        try:
            return max(0, self._object.stat().st_size - _HEADER.size) // _RECORD
        except FileNotFoundError:
            return 0

    def _read_tail(self, n: int) -> bytes:
        try:
            blob = self._tail.read_bytes()
        except FileNotFoundError:
            return b""
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._tail_aad(n))
        except InvalidTag:
            raise VaultError("upload state failed authentication") from None

    def offset(self) -> int:
        n = self._n_chunks()
        return n * CHUNK + len(self._read_tail(n))

    def appender(self, *, limit: int) -> UploadAppender:
        """Start appending one request's body; call :meth:`UploadAppender.close` in every case."""
        return UploadAppender(self, limit)

    def append(self, pieces: Iterable[bytes], *, limit: int) -> int:
        """Append a whole body; returns the new offset. Raises ``ValueError`` past ``limit``."""
        app = self.appender(limit=limit)
        try:
            for piece in pieces:
                app.write(piece)
        finally:
            app.close()
        return app.offset

    def head(self, size: int) -> bytes:
        """The first ``size`` plaintext bytes that arrived (type and header checks)."""
        out = bytearray()
        n = self._n_chunks()
        if n:
            with open(self._object, "rb") as f:
                f.seek(_HEADER.size)
                for i in range(n):
                    rec = f.read(_RECORD)
                    try:
                        out += self._aead.decrypt(rec[:12], rec[12:], _aad(self.key_id, self.object_id, i, False))
                    except InvalidTag:
                        raise VaultError("upload state failed authentication") from None
                    if len(out) >= size:
                        return bytes(out[:size])
        out += self._read_tail(n)
        return bytes(out[:size])

    def complete(self) -> ObjectInfo:
        """Seal the tail as the last chunk and move the object into the vault (no re-encryption)."""
        app = UploadAppender(self, limit=self.offset())  # truncates any partial record a crash left
        app.close(last=True)
        return self.publish(app.offset)

    def publish(self, size: int) -> ObjectInfo:
        """Move an object whose final chunk :meth:`UploadAppender.close` sealed (``last=True``)
        into the vault."""
        dest = self.vault.object_path(self.key_id, self.object_id)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(self._object, dest)
        _fsync_dir(dest.parent)
        self.discard()
        return ObjectInfo(self.object_id, size, None)

    def discard(self) -> None:
        for p in (self._object, self._tail):
            if p.exists():
                shred_file(p)
        shutil.rmtree(self.dir, ignore_errors=True)


class UploadAppender:
    """Appends to an :class:`UploadStaging`. Full chunks are sealed and written as they fill; the
    unfinished tail is sealed on :meth:`close`, so whatever arrived before a dropped connection
    is kept: that is the offset a tus client resumes from."""

    def __init__(self, staging: UploadStaging, limit: int) -> None:
        self.st = staging
        self.limit = limit
        self.n = staging._n_chunks()
        # The unsealed remainder, in one fixed buffer (no growing and shrinking per piece).
        self._buf = bytearray(CHUNK)
        tail = staging._read_tail(self.n)
        self._buf[: len(tail)] = tail
        self._fill = len(tail)
        path = staging._object
        self.sealed_last = False
        self._tail_gone = False
        if not path.exists() or path.stat().st_size < _HEADER.size:
            # No fsync of its own: the object is made durable with its chunks, by close() (whose
            # tail write also syncs this directory) or by publish().
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(MAGIC, CHUNK))
        # Drop any partial record a crash may have left after the last full one.
        if path.stat().st_size != _HEADER.size + self.n * _RECORD:
            os.truncate(path, _HEADER.size + self.n * _RECORD)
        self.f: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._sealed = bytearray(CHUNK + _TAG)  # one full chunk's ciphertext and tag

    @property
    def offset(self) -> int:
        return self.n * CHUNK + self._fill

    def write(self, piece: bytes) -> None:
        if self.offset + len(piece) > self.limit:
            raise ValueError("upload larger than its declared length")
        src = memoryview(piece)
        pos = 0
        while pos < len(src):
            take = min(CHUNK - self._fill, len(src) - pos)
            self._buf[self._fill : self._fill + take] = src[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == CHUNK:
                self._seal_full()

    def _seal_full(self) -> None:
        st = self.st
        if not self._tail_gone:
            # A tail file from an earlier request is bound to the chunk count before this one:
            # remove it (its bytes are in the buffer) before any new chunk lands, so a crash in
            # the middle of this request leaves a consistent state that resumes at the last chunk.
            if st._tail.exists():
                st._tail.unlink()
                _fsync_dir(st.dir)
            self._tail_gone = True
        _write_full_record(self.f, st._aead, self._buf, _aad(st.key_id, st.object_id, self.n, False), self._sealed)
        self.n += 1
        self._fill = 0

    def _unsealed(self) -> bytes:
        return bytes(self._buf[: self._fill])

    def write_many(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def abandon(self) -> None:
        """Close without writing anything more (the upload was deleted under this request)."""
        if not self.f.closed:
            self.f.close()

    def close(self, *, last: bool = False) -> None:
        """End this request's appending. ``last``: every declared byte has arrived (and been
        checked): the tail is sealed as the final chunk straight into the object, with one fsync
        and no tail file, ready for :meth:`UploadStaging.publish`. A crash before the publish
        leaves a short final record, which the next appender truncates as a partial one: the
        upload then resumes from its last full chunk."""
        if self.f.closed:
            return
        if last and self.offset != self.limit:
            raise ValueError("the upload is not whole")
        try:
            if last:
                st = self.st
                if st._tail.exists():  # an earlier request's tail (ciphertext), now part of this one's
                    st._tail.unlink()
                    _fsync_dir(st.dir)  # never a stale tail bound to fewer chunks after a crash
                self.f.write(_seal(st._aead, self._unsealed(), _aad(st.key_id, st.object_id, self.n, True)))
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            self.f.close()
        if last:
            self.sealed_last = True
            return
        _write_private(self.st._tail, _seal(self.st._aead, self._unsealed(), self.st._tail_aad(self.n)))
