"""Controllers (tenants), their contracts and API tokens: the functions the CLI and the admin API share."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dataprotection import register
from dataprotection.subjects import index_key_id
from dataprotection.vault import KeyStore
from siteplan.db import ApiToken, Contract, Tenant
from siteplan.states import ContractState

SCOPES = ("upload", "read", "admin")
TOKEN_PREFIX = "sp_"


class TenancyError(ValueError):
    """A tenancy request that cannot be done as asked (the message says why)."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_tenant(db: Session, keys: KeyStore, *, label: str) -> Tenant:
    label = label.strip()
    if not label or len(label) > 200:
        raise TenancyError("a tenant needs a label of 1 to 200 characters")
    t = Tenant(label=label)
    db.add(t)
    db.flush()
    keys.create(index_key_id(t.id))
    return t


def create_contract(
    db: Session, keys: KeyStore, *, tenant_id: str, starts_on: date | None = None, actor: str = "operator"
) -> Contract:
    c = Contract(tenant_id=tenant_id, starts_on=starts_on or date.today(), state=ContractState.ACTIVE)
    db.add(c)
    db.flush()
    keys.create(c.id)  # the contract's data key: destroying it shreds every copy of its media
    register.record(
        db,
        tenant_id=tenant_id,
        actor=actor,
        action="contract_started",
        categories=["account"],
        purpose="processing agreement for COVER design services",
        ref=c.id,
    )
    return c


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str  # shown once, never stored


def create_token(db: Session, *, tenant_id: str, name: str, scopes: list[str], days: int | None = 90) -> IssuedToken:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise TenancyError(f"scopes must be some of {', '.join(SCOPES)}")
    if db.get(Tenant, tenant_id) is None:
        raise TenancyError("no such tenant")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = datetime.now(UTC) + timedelta(days=days) if days else None
    tok = ApiToken(
        tenant_id=tenant_id,
        name=name[:100],
        secret_hash=hash_secret(secret),
        scopes=" ".join(sorted(set(scopes))),
        expires_at=expires,
    )
    db.add(tok)
    db.flush()
    return IssuedToken(tok, secret)


def rotate_token(db: Session, *, token_id: str, days: int | None = 90) -> IssuedToken:
    """Issue a new secret with the same name and scopes, and revoke the old one."""
    old = db.get(ApiToken, token_id)
    if old is None or old.revoked_at is not None:
        raise TenancyError("no such active token")
    old.revoked_at = datetime.now(UTC)
    return create_token(db, tenant_id=old.tenant_id, name=old.name, scopes=old.scopes.split(), days=days)


def verify_token(db: Session, secret: str) -> ApiToken | None:
    """The active token with this secret, or None (unknown, revoked or expired)."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 100:
        return None
    tok = db.scalars(select(ApiToken).where(ApiToken.secret_hash == hash_secret(secret))).first()
    if tok is None or tok.revoked_at is not None:
        return None
    if tok.expires_at is not None:
        exp = tok.expires_at if tok.expires_at.tzinfo else tok.expires_at.replace(tzinfo=UTC)
        if exp <= datetime.now(UTC):
            return None
    return tok
