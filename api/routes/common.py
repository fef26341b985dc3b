"""Helpers the routers share: idempotent creation, request bodies with a size cap, paging."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Response
from pydantic import BaseModel
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.services import Services
from dataprotection.subjects import index_key_id
from dataprotection.vault import KeyDestroyed
from siteplan.db import IdempotencyRecord

IDEMPOTENCY_HELP = "A client-chosen key: a retried request with the same key returns the first result."


# A retry comes within minutes; a key is kept a day (as Stripe's are), then forgotten.
IDEMPOTENCY_TTL = timedelta(hours=24)


def fingerprint(svc: Services, tenant_id: str, method: str, path: str, body: Any) -> str:
    """What a key was first used for, to tell a retry from a different request. A keyed hash
    (the controller's index key, domain-separated): a plain hash of a subject's name, address and
    phone could be confirmed by guessing, and would outlive the subject's erasure."""
    raw = json.dumps([method, path, body], sort_keys=True, default=str).encode()
    key_id = index_key_id(tenant_id)
    try:
        key = svc.vault.keys.get(key_id)
    except KeyDestroyed:  # a tenant from before the index keys: give it one now
        svc.vault.keys.create(key_id)
        key = svc.vault.keys.get(key_id)
    return hmac.new(key, b"siteplan-idempotency/v1\0" + raw, hashlib.sha256).hexdigest()


def expire_replays(db: Session, tenant_id: str | None = None) -> None:
    """Delete replay records past IDEMPOTENCY_TTL: one tenant's (before a replay), or all (the
    runner's hourly sweep, for tenants that send no more requests)."""
    stmt = delete(IdempotencyRecord).where(IdempotencyRecord.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL)
    if tenant_id is not None:
        stmt = stmt.where(IdempotencyRecord.tenant_id == tenant_id)
    db.execute(stmt)


def replay(db: Session, key: str | None, fp: str) -> IdempotencyRecord | None:
    if not key:
        return None
    if len(key) > 100:
        raise ApiError(422, "invalid", "Idempotency-Key is at most 100 characters", field="Idempotency-Key")
    expire_replays(db, db.info.get("tenant_id"))
    rec = db.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == key)).first()
    if rec is not None and rec.fingerprint != fp:
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was used for a different request",
            field="Idempotency-Key",
        )
    return rec


def remember(
    db: Session,
    *,
    tenant_id: str,
    key: str | None,
    fp: str,
    status: int,
    body: BaseModel | dict[str, Any],
    location: str | None = None,
) -> None:
    """Store the first response under the key, in the same transaction as the created rows."""
    if not key:
        return
    data = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
    db.add(IdempotencyRecord(tenant_id=tenant_id, key=key, fingerprint=fp, status=status, body=data, location=location))


def commit_or_conflict(db: Session) -> None:
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise ApiError(409, "conflict", "a concurrent request with the same Idempotency-Key won; retry") from None


def set_location(response: Response, location: str | None) -> None:
    if location:
        response.headers["Location"] = location


def count(db: Session, stmt: Any) -> int:
    return int(db.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)
