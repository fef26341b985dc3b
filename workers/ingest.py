"""The ingest stage: from the encrypted quarantine to an anonymised photo in the vault.

:func:`ingest_photo` claims a quarantined photo (a lease), checks consent, runs the gate
(:func:`ingest`) and records the outcome: every state transition of a photo is here. The API's
runner schedules it (per tenant, in turn); the demo runs the gate on Ray and seals the results.

The original never leaves encryption except in this process's memory; it is destroyed right
after anonymisation unless the controller's written instruction says to keep it (policy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dataprotection import register
from dataprotection.consent import consent_problem
from dataprotection.lifecycle import contract_shared
from dataprotection.vault import ObjectInfo, Vault, VaultError
from privacy.anonymize import AnonymizationPolicy, anonymize
from privacy.errors import DetectionFailed, InvalidImage
from privacy.sandbox import SandboxUnavailable
from siteplan import leases
from siteplan.db import Contract, Photo, Project
from siteplan.settings import Settings
from siteplan.states import ContractState, PhotoState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    photo: ObjectInfo | None  # the anonymised JPEG, or None when refused
    intrinsics: dict[str, Any] | None
    faces: int
    plates: int
    error: str | None  # a message a designer can act on, with the error code
    original_destroyed: bool


def ingest(
    vault: Vault,
    *,
    key_id: str,
    original: str,
    policy: AnonymizationPolicy,
    guard: Callable[[], AbstractContextManager[bool]] | None = None,
) -> IngestResult:
    """``guard``: entered around the write of the new JPEG; it says whether the photo may still
    be written (the caller holds the contract's data lock in it and checks the photo's row, so
    nothing is written into a container a termination or an erasure has just emptied)."""
    data = vault.read_bytes(key_id, original)
    try:
        photo = anonymize(data, policy)
    except InvalidImage as exc:
        destroyed = vault.delete(key_id, original)  # a refused file is never kept
        return IngestResult(None, None, 0, 0, f"{exc} [{exc.code}]", destroyed)
    except DetectionFailed as exc:
        destroyed = vault.delete(key_id, original)
        return IngestResult(None, None, 0, 0, f"{exc}; the photo was refused (fail-closed policy)", destroyed)
    finally:
        del data
    with guard() if guard is not None else contextlib.nullcontext(True) as ok:
        if not ok:
            return IngestResult(None, None, 0, 0, "the photo was deleted while it was anonymised", False)
        info = vault.put(key_id, photo.jpeg)
        destroyed = False
        if not policy.keep_original:
            destroyed = vault.delete(key_id, original)
    log.info("photo anonymised: %d faces, %d plates, %.2f s", len(photo.faces), len(photo.plates), photo.seconds)
    return IngestResult(info, photo.intrinsics.to_json(), len(photo.faces), len(photo.plates), None, destroyed)


def ingest_photo(settings: Settings, factory: sessionmaker[Session], vault: Vault, photo_id: str) -> None:
    """Quarantine -> anonymised (or rejected). Safe to run twice, from any number of processes:
    a photo is claimed with one conditional UPDATE that leases it to this process
    (siteplan/leases.py), and only the holder of the lease may finish it."""
    with factory.begin() as db:
        claimed = db.execute(
            update(Photo)
            .where(Photo.id == photo_id, Photo.state == PhotoState.QUARANTINED, Photo.original_object.is_not(None))
            .values(state=PhotoState.ANONYMISING, updated_at=datetime.now(UTC), **leases.claim_values())
        ).rowcount  # type: ignore[attr-defined]
        if not claimed:
            return
        p = db.get(Photo, photo_id)
        assert p is not None
        if consent_problem(db, db.get(Project, p.project_id)):
            # Checked when the work starts: an ended contract or a restricted client's photo is
            # not processed; it stays sealed in quarantine.
            p.state, p.lease_holder, p.lease_until = PhotoState.QUARANTINED, None, None
            return
        key_id, original = p.contract_id, p.original_object
        assert original is not None
    lease = leases.Lease(factory, Photo, photo_id).start()
    try:
        _ingest_claimed(settings, factory, vault, photo_id, key_id, original)
    finally:
        lease.release()


def upload_policy(settings: Settings) -> AnonymizationPolicy:
    """The gate's policy for an uploaded photo: its pixel cap is the upload cap the API checks
    while the photo streams (``max_upload_pixels``), so a file whose header lies past the part
    read while streaming meets the same limit, and raising the setting raises both."""
    return AnonymizationPolicy(max_pixels=settings.max_upload_pixels)


def _ingest_claimed(
    settings: Settings, factory: sessionmaker[Session], vault: Vault, photo_id: str, key_id: str, original: str
) -> None:
    ours = (Photo.id == photo_id, Photo.state == PhotoState.ANONYMISING, leases.mine(Photo))

    @contextlib.contextmanager
    def still_ours() -> Iterator[bool]:
        # The new JPEG is written under the contract's data lock, shared, once the row says it
        # is still ours: never into a container a termination or an erasure has just emptied.
        with contract_shared(settings.dirs, key_id), factory() as db:
            c = db.get(Contract, key_id)
            active = c is not None and c.state == ContractState.ACTIVE
            yield active and db.execute(select(Photo.id).where(*ours)).first() is not None

    try:
        res = ingest(vault, key_id=key_id, original=original, policy=upload_policy(settings), guard=still_ours)
    except SandboxUnavailable:
        # Our side failed, not the file: back to quarantine, untouched, for the next attempt
        # (the runner's recovery pass picks quarantined photos up again).
        with factory.begin() as db:
            db.execute(update(Photo).where(*ours).values(state=PhotoState.QUARANTINED))
        raise
    except VaultError:
        log.warning("photo %s: its quarantined original is unreadable", photo_id[:8])
        with factory.begin() as db:
            db.execute(
                update(Photo)
                .where(*ours)
                .values(state=PhotoState.REJECTED, error="the upload could not be read back; please upload it again")
            )
        return
    with factory.begin() as db:
        p = db.scalars(select(Photo).where(*ours).with_for_update()).first()
        if p is None:  # erased meanwhile, or the claim was lost to another process: drop ours
            if res.photo:
                vault.delete(key_id, res.photo.object_id)
            return
        if res.original_destroyed:
            p.original_object = None
        if res.photo is None:
            p.state, p.error = PhotoState.REJECTED, res.error
        else:
            p.state, p.object, p.sha256 = PhotoState.ANONYMISED, res.photo.object_id, res.photo.sha256
            p.intrinsics, p.faces, p.plates = res.intrinsics, res.faces, res.plates
        register.record(
            db,
            tenant_id=p.tenant_id,
            actor="system",
            action="photo_anonymised",
            categories=["photos", "derived_media"],
            purpose="privacy gate: metadata, faces and plates",
            ref=p.id,
        )
