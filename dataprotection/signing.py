"""The service's Ed25519 signing key, for destruction certificates (and anything else it attests)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from siteplan.files import write_atomic


def canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_or_create(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(path, pem)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 key")
    return loaded


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def fingerprint(public_key_b64: str) -> str:
    return "SHA256:" + hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:32]


def sign(key: Ed25519PrivateKey, document: dict[str, Any]) -> dict[str, Any]:
    """``{"document": ..., "signature": {...}}``; the signature covers the canonical JSON."""
    pub = public_b64(key)
    return {
        "document": document,
        "signature": {
            "alg": "Ed25519",
            "public_key": pub,
            "key_fingerprint": fingerprint(pub),
            "value": base64.b64encode(key.sign(canonical(document))).decode(),
        },
    }


def verify(signed: dict[str, Any]) -> bool:
    try:
        sig = signed["signature"]
        if sig.get("alg") != "Ed25519":
            return False
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig["public_key"]))
        pub.verify(base64.b64decode(sig["value"]), canonical(signed["document"]))
        return True
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False
