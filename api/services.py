"""What the API process holds: settings, the session factory, the vault and the background runner."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from privacy.vault import Vault
from siteplan.settings import Settings

log = logging.getLogger(__name__)


class RateLimiter:
    """Token bucket per API token: ``rate`` requests per minute, bursts up to ``burst``.

    In-process (one bucket table per server process). Behind several processes the limit is per
    process; a shared store (Redis) is the production upgrade, behind this same interface.
    """

    def __init__(self, per_minute: int, burst: int, max_keys: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_keys

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
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
