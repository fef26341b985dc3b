"""From the encrypted quarantine to an anonymised photo in the vault.

The original never leaves encryption except in this process's memory; it is destroyed right
after anonymisation unless the controller's written instruction says to keep it (policy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from dataprotection.vault import ObjectInfo, Vault
from privacy.anonymize import AnonymizationPolicy, anonymize
from privacy.errors import DetectionFailed, InvalidImage

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
