"""From the encrypted quarantine to an anonymised photo in the vault.

The original never leaves encryption except in this process's memory; it is destroyed right
after anonymisation unless the controller's written instruction says to keep it (policy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from privacy.anonymize import AnonymizationPolicy, anonymize
from privacy.errors import DetectionFailed, InvalidImage
from privacy.vault import ObjectInfo, Vault

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    photo: ObjectInfo | None  # the anonymised JPEG, or None when refused
    intrinsics: dict[str, Any] | None
    faces: int
    plates: int
    error: str | None  # a message a designer can act on, with the error code
    original_destroyed: bool


def ingest(vault: Vault, *, key_id: str, original: str, policy: AnonymizationPolicy) -> IngestResult:
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
    info = vault.put(key_id, photo.jpeg)
    destroyed = False
    if not policy.keep_original:
        destroyed = vault.delete(key_id, original)
    log.info("photo anonymised: %d faces, %d plates, %.2f s", len(photo.faces), len(photo.plates), photo.seconds)
    return IngestResult(info, photo.intrinsics.to_json(), len(photo.faces), len(photo.plates), None, destroyed)
