"""The vault: every stored personal object encrypted at rest, with one data key per contract.

- Objects are sealed with AES-256-GCM in the STREAM construction (Hoang et al., 2015): the
  plaintext is cut into fixed-size chunks, each sealed with nonce = random prefix ‖ counter ‖
  last-flag. A reordered, dropped or truncated chunk fails authentication, and an object can be
  written and read without ever holding it whole in memory.
- Data keys are per (controller, contract) and are wrapped by a master key held by a
  :class:`KeyStore` (a file key in the embedded default; a KMS in production). Destroying a
  contract's key makes every copy of its objects unreadable, backups included
  (crypto-shredding), as long as the key store itself is kept out of backups (docs/vault.md).
- Object names are random: they carry no file name, no subject and no contract detail.
- Uploads in progress are kept encrypted too: full chunks are sealed as they arrive, and the
  unfinished tail is re-sealed under a fresh nonce at the end of each request.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

MAGIC = b"SPV1"
CHUNK = 1 << 20  # 1 MiB plaintext per sealed chunk: bounded memory, 16 bytes of tag overhead per MiB
_TAG = 16
_RECORD = 12 + CHUNK + _TAG  # one sealed chunk of an upload in progress: nonce, ciphertext, tag
_HEADER = struct.Struct(">4sI7s")  # magic, chunk size, nonce prefix


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
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def _aad(key_id: str, object_id: str) -> bytes:
    return f"siteplan-vault/v1/{key_id}/{object_id}".encode()


@dataclass(frozen=True)
class ObjectInfo:
    object_id: str
    size: int
    sha256: str  # of the plaintext; lets a certificate or export name an object without revealing it


class SealedWriter:
    """Writes one object, chunk by chunk, to a temporary file; :meth:`commit` renames it into place."""

    def __init__(self, vault: Vault, key_id: str, object_id: str) -> None:
        self._aead = AESGCM(vault.keys.get(key_id))
        self._aad = _aad(key_id, object_id)
        self._prefix = secrets.token_bytes(7)
        self._path = vault.object_path(key_id, object_id)
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tmp = self._path.with_name(f".tmp-{object_id}-{secrets.token_hex(4)}")
        self._f: BinaryIO = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._f.write(_HEADER.pack(MAGIC, CHUNK, self._prefix))
        self._buf = bytearray()
        self._counter = 0
        self._size = 0
        self._hash = hashlib.sha256()
        self.object_id = object_id

    def write(self, data: bytes | memoryview) -> None:
        self._buf += data
        self._size += len(data)
        self._hash.update(data)
        while len(self._buf) > CHUNK:  # keep at least one byte back: the last chunk is flagged
            self._seal(bytes(self._buf[:CHUNK]), last=False)
            del self._buf[:CHUNK]

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        self._f.write(self._aead.encrypt(_nonce(self._prefix, self._counter, last), chunk, self._aad))
        self._counter += 1

    def commit(self) -> ObjectInfo:
        self._seal(bytes(self._buf), last=True)
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
        aad = _aad(key_id, object_id)
        path = self.object_path(key_id, object_id)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, in the generator
        except FileNotFoundError:
            raise VaultError("no such object") from None
        return self._chunks(f, aead, aad)

    @staticmethod
    def _chunks(f: BinaryIO, aead: AESGCM, aad: bytes) -> Iterator[bytes]:
        with f:
            head = f.read(_HEADER.size)
            if len(head) != _HEADER.size:
                raise VaultError("object is truncated")
            magic, chunk, prefix = _HEADER.unpack(head)
            if magic != MAGIC or chunk <= 0 or chunk > 64 * CHUNK:
                raise VaultError("not a vault object")
            counter = 0
            cur = f.read(chunk + _TAG)
            while True:
                nxt = f.read(chunk + _TAG)
                last = not nxt
                try:
                    yield aead.decrypt(_nonce(prefix, counter, last), cur, aad)
                except InvalidTag:
                    raise VaultError("object failed authentication (tampered or truncated)") from None
                if last:
                    return
                cur, counter = nxt, counter + 1

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


class UploadStaging:
    """An upload in progress: ``<dir>/chunks`` holds sealed full chunks, ``<dir>/tail`` the sealed
    unfinished remainder (under 1 MiB). The offset survives restarts; plaintext never hits disk."""

    def __init__(self, directory: Path, key: bytes, upload_id: str) -> None:
        self.dir = directory
        self._aead = AESGCM(key)
        self._aad = f"siteplan-upload/v1/{_check_id(upload_id)}".encode()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def _chunks(self) -> Path:
        return self.dir / "chunks"

    @property
    def _tail(self) -> Path:
        return self.dir / "tail"

    def _chunk_aad(self, index: int) -> bytes:
        return self._aad + b"/chunk/" + str(index).encode()

    def _read_tail(self) -> bytes:
        try:
            blob = self._tail.read_bytes()
        except FileNotFoundError:
            return b""
        n_chunks = self._n_chunks()
        try:
            return self._aead.decrypt(blob[:12], blob[12:], self._aad + b"/tail/" + str(n_chunks).encode())
        except InvalidTag:
            raise VaultError("upload state failed authentication") from None

    def _n_chunks(self) -> int:
        try:
            return self._chunks.stat().st_size // _RECORD
        except FileNotFoundError:
            return 0

    def offset(self) -> int:
        return self._n_chunks() * CHUNK + len(self._read_tail())

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

    def plaintext(self) -> Iterator[bytes]:
        n = self._n_chunks()
        if n:
            with open(self._chunks, "rb") as f:
                for i in range(n):
                    blob = f.read(_RECORD)
                    try:
                        yield self._aead.decrypt(blob[:12], blob[12:], self._chunk_aad(i))
                    except InvalidTag:
                        raise VaultError("upload state failed authentication") from None
        tail = self._read_tail()
        if tail:
            yield tail

    def discard(self) -> None:
        for p in (self._chunks, self._tail):
            shred_file(p)
        shutil.rmtree(self.dir, ignore_errors=True)


class UploadAppender:
    """Appends to an :class:`UploadStaging`. Full chunks are sealed and written as they fill; the
    unfinished tail is sealed on :meth:`close`, so whatever arrived before a dropped connection
    is kept: that is the offset a tus client resumes from."""

    def __init__(self, staging: UploadStaging, limit: int) -> None:
        self.st = staging
        self.limit = limit
        self.tail = bytearray(staging._read_tail())
        self.n = staging._n_chunks()
        # Drop any partial record a crash may have left after the last full one.
        if staging._chunks.exists() and staging._chunks.stat().st_size != self.n * _RECORD:
            os.truncate(staging._chunks, self.n * _RECORD)
        self.f: BinaryIO = open(staging._chunks, "ab")  # noqa: SIM115 - closed in close()

    @property
    def offset(self) -> int:
        return self.n * CHUNK + len(self.tail)

    def write(self, piece: bytes) -> None:
        if self.offset + len(piece) > self.limit:
            raise ValueError("upload larger than its declared length")
        self.tail += piece
        while len(self.tail) >= CHUNK:
            # A random nonce per record: a chunk re-sent after a crash is never sealed twice
            # under the same nonce.
            nonce = secrets.token_bytes(12)
            self.f.write(nonce + self.st._aead.encrypt(nonce, bytes(self.tail[:CHUNK]), self.st._chunk_aad(self.n)))
            del self.tail[:CHUNK]
            self.n += 1

    def close(self) -> None:
        if self.f.closed:
            return
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        nonce = secrets.token_bytes(12)
        aad = self.st._aad + b"/tail/" + str(self.n).encode()
        _write_private(self.st._tail, nonce + self.st._aead.encrypt(nonce, bytes(self.tail), aad))
