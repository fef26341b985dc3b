"""What the API process holds: settings, the session factory, the vault and the background runner."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from privacy.vault import Vault
from siteplan.settings import Settings

log = logging.getLogger(__name__)


class RateLimiter:
    """Token bucket per API token: ``rate`` requests per minute, bursts up to ``burst``.

    One bucket per token for the whole host: each is 16 bytes (tokens left, last update on the
    system-wide monotonic clock) in a file of ``directory``, read and written under an ``flock``.
    So ``siteplan serve --workers N`` and other server processes sharing the data folder share
    the limit; an in-process table would allow N times the rate. About 6 us per request here.
    The file names are digests of the token ids; the files hold no personal data.
    """

    _STATE = struct.Struct("<dd")

    def __init__(self, per_minute: int, burst: int, directory: Path) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        return self.dir / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait (whole seconds, for ``Retry-After``)."""
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            now = time.monotonic()
            raw = os.pread(fd, self._STATE.size, 0)
            tokens, last = self._STATE.unpack(raw) if len(raw) == self._STATE.size else (self.burst, now)
            if not (math.isfinite(tokens) and last <= now):  # torn or from before a reboot
                tokens, last = self.burst, now
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            os.pwrite(fd, self._STATE.pack(tokens, now), 0)
        finally:
            os.close(fd)  # releases the lock
        return math.ceil(wait) if wait else 0.0


@dataclass(frozen=True)
class CachedToken:
    tenant_id: str
    token_id: str
    scopes: frozenset[str]
    valid_until: float  # monotonic: the earlier of the cache TTL and the token's own expiry


class TokenCache:
    """Verified tokens for a few seconds, keyed by the secret's hash: spares a DB round trip on
    every request. A revoked or rotated token stops working within ``ttl_s`` in every process."""

    def __init__(self, ttl_s: float = 10.0, max_items: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, CachedToken] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_items

    def get(self, key: str) -> CachedToken | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit.valid_until <= time.monotonic():
                del self._items[key]
                return None
            return hit

    def put(self, key: str, value: CachedToken) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._max:
                self._items.popitem(last=False)


@dataclass
class Services:
    settings: Settings
    factory: sessionmaker[Session]
    vault: Vault
    limiter: RateLimiter
    tokens: TokenCache = field(default_factory=TokenCache)
    runner: object | None = None  # api.runner.Runner, set at start-up
