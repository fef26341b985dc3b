"""Uploads in progress, apart from HTTP: their staging in the vault, the lock that keeps one
writer per upload across threads and server processes, deletion, and expiry. The tus routes
(api/routes/photos.py) and the runner's hourly sweep (api/runner.py) both use these.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from api.services import Services
from dataprotection.lifecycle import ContractBusy, contract_lock
from dataprotection.vault import (
    UploadAppender,
    UploadStaging,
    VaultError,
    contract_lock_path,
    discard_upload,
    file_lock,
    shred_upload_dir,
    upload_lock_path,
    upload_staging,
)
from siteplan.db import Contract, Photo, tenant_session
from siteplan.paths import lifecycle_paths
from siteplan.states import ContractState, PhotoState

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    id: str
    contract_id: str
    length: int
    error: str | None = None


def staging_of(svc: Services, p: Photo | Upload) -> UploadStaging:
    # The quarantined original will be the vault object named after the photo (a random id).
    return upload_staging(svc.settings.uploads_dir, svc.vault, p.contract_id, p.id)


def reread(db: Session, photo_id: str) -> Photo:
    """The upload's row as it is now, not as this session first saw it: read again once the lock
    is held (the request we waited for may have finished, refused or deleted it)."""
    db.expire_all()
    fresh = db.get(Photo, photo_id)
    if fresh is None:
        raise not_found("upload")
    return fresh


def lock_path(svc: Services, p: Photo | Upload) -> Path:
    return upload_lock_path(svc.settings.uploads_dir, p.contract_id, p.id)


@contextmanager
def locked(svc: Services, p: Photo | Upload, *, exclusive: bool, wait_s: float = 0.0) -> Iterator[None]:
    """One PATCH at a time per upload, across threads and server processes; HEAD takes a shared
    lock so it never reads a half-written state (it waits a little for a PATCH to finish).
    The lock file sits beside the staging directory, not in it: finishing an upload deletes that
    directory, and a request waiting on the lock must still hold the same file when it gets it.
    Every holder reads the upload's state again once it has the lock."""
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(lock_path(svc, p), exclusive=exclusive, wait_s=wait_s))
        except TimeoutError:
            raise ApiError(409, "upload_busy", "another request is writing this upload; retry shortly") from None
        yield


def drop_upload(db: Session, svc: Services, p: Photo, *, wait_s: float = 1.0) -> None:
    """Delete an unfinished upload, never under a PATCH that is writing it (409 upload_busy)."""
    with locked(svc, p, exclusive=True, wait_s=wait_s):
        fresh = reread(db, p.id)
        if fresh.state != PhotoState.UPLOADING:
            raise ApiError(409, "conflict", "this upload has just completed; delete the photo instead")
        shred_upload_dir(svc.settings.uploads_dir, fresh.contract_id, fresh.id)  # no key needed
        db.delete(fresh)
        db.commit()
        lock_path(svc, fresh).unlink(missing_ok=True)


class UploadGone(ApiError):
    """The upload was deleted (its client erased, its contract ended, or the upload itself)
    while a request was writing it: nothing more is written, 410."""

    def __init__(self) -> None:
        super().__init__(410, "gone", "this upload no longer exists (deleted, or its client's data was erased)")


def _still_open(svc: Services, tenant_id: str, upload_id: str) -> bool:
    with tenant_session(svc.factory, tenant_id) as db:
        p = db.get(Photo, upload_id)
        if p is None or p.state != PhotoState.UPLOADING:
            return False
        c = db.get(Contract, p.contract_id)
        return c is not None and c.state == ContractState.ACTIVE


@contextmanager
def writing(svc: Services, tenant_id: str, p: Upload | Photo, *, wait_s: float = 30.0) -> Iterator[None]:
    """Each write of a PATCH (a batch of chunks, the tail, the publish) holds the contract's data
    lock shared and re-reads the upload's row under it: once a termination or an erasure (which
    hold it exclusive) has deleted the upload, nothing is written any more (UploadGone, 410), so
    no staging directory or sealed tail is made again. Lock order: contract lock, then the
    upload's lock (held by the caller), then the database."""
    path = contract_lock_path(lifecycle_paths(svc.settings).lock_dir, p.contract_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # A termination (long) or an erasure (short) holds it: a gone upload says so at once.
            if not _still_open(svc, tenant_id, p.id):
                raise UploadGone() from None
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise ApiError(
                            409, "upload_busy", "the contract's data is being changed; retry shortly"
                        ) from None
                    time.sleep(0.05)
        # The lock file counts its exclusive holders (dataprotection.lifecycle.bump_generation): the
        # row is read again only when one has held it since this process last looked.
        generation = os.pread(fd, 32, 0)
        if _checked.get(p.id) != generation:
            if not _still_open(svc, tenant_id, p.id):
                raise UploadGone()
            _remember_check(p.id, generation)
        yield
    finally:
        os.close(fd)


_checked: OrderedDict[str, bytes] = OrderedDict()  # upload id -> lock generation it was checked at
_checked_lock = threading.Lock()


def _remember_check(upload_id: str, generation: bytes) -> None:
    with _checked_lock:
        _checked[upload_id] = generation
        _checked.move_to_end(upload_id)
        while len(_checked) > 10_000:
            _checked.popitem(last=False)


def write_guarded(svc: Services, tenant_id: str, p: Upload, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` under :func:`writing` (for run_in_threadpool)."""
    with writing(svc, tenant_id, p):
        return fn(*args)


def close_guarded(svc: Services, tenant_id: str, p: Upload, app: UploadAppender, last: bool) -> None:
    """End a request's appending; if the upload is gone, close the file without writing the tail."""
    try:
        with writing(svc, tenant_id, p):
            app.close(last=last)
    except UploadGone:
        app.abandon()
        raise


def expires(svc: Services, last_activity: float) -> str:
    """tus expiration: when an upload untouched since ``last_activity`` will be deleted."""
    return formatdate(last_activity + svc.settings.upload_expiry_s, usegmt=True)


def last_activity(svc: Services, p: Photo) -> float:
    """The last time bytes of this upload arrived (its staging files' times), else its creation."""
    created = p.created_at
    if created is not None and created.tzinfo is None:  # SQLite hands back naive UTC
        created = created.replace(tzinfo=UTC)
    times = [created.timestamp()] if created is not None else [0.0]
    d = svc.settings.uploads_dir / p.contract_id / p.id
    with contextlib.suppress(OSError):
        times += [f.stat().st_mtime for f in d.iterdir()]
    return max(times)


def expire_uploads(svc: Services) -> int:
    """Delete unfinished uploads untouched for ``upload_expiry_s``, with what arrived of them
    (storage limitation: a half-sent photo of a client's site is still their data). An upload a
    PATCH is writing is left for the next sweep. Returns how many went."""
    cutoff = time.time() - svc.settings.upload_expiry_s
    with svc.factory() as db:
        candidates = list(db.scalars(select(Photo).where(Photo.state == PhotoState.UPLOADING)))
        stale = [p for p in candidates if last_activity(svc, p) < cutoff]
    gone = 0
    for p in stale:
        with tenant_session(svc.factory, p.tenant_id) as db:
            fresh = db.get(Photo, p.id)
            if fresh is None:
                continue
            try:
                with contract_lock(lifecycle_paths(svc.settings), fresh.contract_id, wait_s=0.0):
                    drop_upload(db, svc, fresh, wait_s=0.0)
                gone += 1
            except (ApiError, ContractBusy):  # busy, or completed meanwhile: the next sweep
                continue
    gone += _sweep_orphans(svc)
    if gone:
        log.info("expired %d unfinished uploads", gone)
    return gone


ORPHAN_AGE_S = 3600.0


def _sweep_orphans(svc: Services) -> int:
    """Staging directories and lock files no unfinished upload owns any more (a PATCH that
    wrote after an erasure deleted its row; a crash between the steps of a deletion), untouched
    for an hour: shredded. Without a row the expiry above never sees them."""
    root = svc.settings.uploads_dir
    if not root.is_dir():
        return 0
    with svc.factory() as db:
        live = set(db.scalars(select(Photo.id).where(Photo.state == PhotoState.UPLOADING)))
    cutoff = time.time() - ORPHAN_AGE_S
    gone = 0
    paths = lifecycle_paths(svc.settings)
    for contract_dir in (d for d in root.iterdir() if d.is_dir()):
        try:
            # Under the contract's lock (never beside a termination or an erasure). What is
            # found is shredded without its key: an ended contract's key is destroyed, and a
            # left-over tail is ciphertext all the same.
            with contract_lock(paths, contract_dir.name, wait_s=0.0):
                gone += _sweep_contract_dir(svc, contract_dir, live, cutoff)
        except (ContractBusy, VaultError):  # busy: the next sweep; a name that is no id: not ours
            continue
    return gone


def _sweep_contract_dir(svc: Services, contract_dir: Path, live: set[str], cutoff: float) -> int:
    root = svc.settings.uploads_dir
    gone = 0
    for entry in list(contract_dir.iterdir()):
        pid = entry.name[1:-5] if entry.name.startswith(".") and entry.name.endswith(".lock") else entry.name
        try:
            if pid in live or entry.stat().st_mtime > cutoff:
                continue
            if entry.is_dir():
                discard_upload(root, svc.vault, contract_dir.name, pid)
                gone += 1
            else:
                entry.unlink(missing_ok=True)
        except (OSError, VaultError):  # a name that is no upload id: not ours to touch
            continue
    with contextlib.suppress(OSError):
        contract_dir.rmdir()  # empty now: an ended contract leaves no folder
    return gone
