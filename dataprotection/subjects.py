"""Data subjects' personal fields: sealed per contract, searchable through a keyed blind index (P5).

The blind index stores, per subject, HMAC-SHA256 digests (truncated to 128 bits) of each
normalised word of the name and address and of its prefixes of 3+ characters, keyed by a
per-controller index key. A search for "Janss" hashes the query the same way and matches
digests; the server never holds a plaintext index. What it leaks (docs/vault.md): which subjects
share a word or prefix (equality), and how common a digest is (frequency), within one controller.
Prefixes start at 3 characters to limit that; digests of different controllers never compare.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.orm import Session

from dataprotection.vault import KeyStore, open_field, seal_field
from siteplan.db import Subject, SubjectToken, new_id

MIN_PREFIX = 3
MAX_WORD = 32
_WORD = re.compile(r"[a-z0-9]+")


def normalise_words(text: str) -> list[str]:
    """Casefold, strip accents and punctuation: "Kerkstraat 12, Gent" -> ["kerkstraat", "12", "gent"]."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()
    return [w[:MAX_WORD] for w in _WORD.findall(folded)]


def index_key_id(tenant_id: str) -> str:
    return f"{tenant_id}-index"


def _digest(key: bytes, token: str) -> str:
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()[:32]


def index_digests(key: bytes, *texts: str | None) -> set[str]:
    out: set[str] = set()
    for text in texts:
        for w in normalise_words(text or ""):
            for n in range(min(MIN_PREFIX, len(w)), len(w) + 1):
                out.add(_digest(key, w[:n]))
    return out


def query_digests(key: bytes, query: str) -> list[str]:
    """One digest per query word (every word must match); words under 3 characters match whole words only."""
    return [_digest(key, w) for w in normalise_words(query)]


@dataclass(frozen=True)
class SubjectFields:
    name: str
    address: str | None = None
    phone: str | None = None


def seal_subject(keys: KeyStore, contract_id: str, subject_id: str, f: SubjectFields) -> dict[str, str | None]:
    key = keys.get(contract_id)

    def seal(col: str, v: str | None) -> str | None:
        return None if v is None else seal_field(key, v, context=f"subjects/{subject_id}/{col}")

    return {
        "name_enc": seal("name", f.name),
        "address_enc": seal("address", f.address),
        "phone_enc": seal("phone", f.phone),
    }


def open_subject(
    keys: KeyStore, contract_id: str, subject_id: str, name_enc: str, address_enc: str | None, phone_enc: str | None
) -> SubjectFields:
    key = keys.get(contract_id)

    def unseal(col: str, v: str | None) -> str | None:
        return None if v is None else open_field(key, v, context=f"subjects/{subject_id}/{col}")

    return SubjectFields(
        name=unseal("name", name_enc) or "", address=unseal("address", address_enc), phone=unseal("phone", phone_enc)
    )


def new_subject(db: Session, keys: KeyStore, *, tenant_id: str, contract_id: str, f: SubjectFields) -> Subject:
    """Insert a subject with its fields sealed in the INSERT itself (the row's id is part of each
    seal, so it is chosen first), then its blind-index digests."""
    sid = new_id()
    s = Subject(id=sid, tenant_id=tenant_id, contract_id=contract_id, **seal_subject(keys, contract_id, sid, f))
    db.add(s)
    db.flush()
    _index(db, keys, s, f)
    return s


def write_fields(db: Session, keys: KeyStore, subject: Subject, f: SubjectFields) -> None:
    """Seal new fields onto an existing subject's row and rebuild its blind-index digests (rectify)."""
    for k, v in seal_subject(keys, subject.contract_id, subject.id, f).items():
        setattr(subject, k, v)
    db.execute(delete(SubjectToken).where(SubjectToken.subject_id == subject.id))
    _index(db, keys, subject, f)


def _index(db: Session, keys: KeyStore, subject: Subject, f: SubjectFields) -> None:
    for d in sorted(index_digests(keys.get(index_key_id(subject.tenant_id)), f.name, f.address)):
        db.add(SubjectToken(tenant_id=subject.tenant_id, subject_id=subject.id, digest=d))


def read_fields(keys: KeyStore, subject: Subject) -> SubjectFields:
    return open_subject(keys, subject.contract_id, subject.id, subject.name_enc, subject.address_enc, subject.phone_enc)
