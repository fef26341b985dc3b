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
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from dataprotection.vault import Vault
from siteplan.settings import Settings

log = logging.getLogger(__name__)


class RateLimiter:
    """Token bucket per API token: ``rate`` requests per minute, bursts up to ``burst``.

    One bucket per token for the whole host: each is 16 bytes (tokens left, last update on the
    host's monotonic clock) in a file of ``directory``, read and written under an ``flock``.
    So ``siteplan serve --workers N`` and other server processes on the data folder share the
    limit; an in-process table would allow N times the rate. About 6 us per request here. The
    folder must be local to one host (the clock is). File names are digests of the token ids;
    the files hold no personal data, and a bucket idle long enough to be full again is removed.

    The limiter never takes the API down: if its folder cannot be written (removed, read-only,
    full), requests are let through and the problem is logged once.
    """

    _STATE = struct.Struct("<dd")
    _SWEEP_EVERY = 4096  # takes between sweeps of idle buckets, per process

    def __init__(self, per_minute: int, burst: int, directory: Path) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._takes = 0
        self._failing = False
        self.sweep()

    @property
    def idle_s(self) -> float:
        """Seconds after which an untouched bucket is full again (and can be forgotten)."""
        return self.burst / self.rate + 1.0

    def _path(self, key: str) -> Path:
        return self.dir / hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait (whole seconds, for ``Retry-After``)."""
        self._takes += 1
        if self._takes % self._SWEEP_EVERY == 0:
            self.sweep()
        try:
            try:
                wait = self._take(key)
            except FileNotFoundError:  # the folder went away: make it again, once
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                wait = self._take(key)
        except OSError as exc:
            if not self._failing:
                log.error("rate limits are off: their folder cannot be written (%s)", exc.strerror)
                self._failing = True
            return 0.0
        if self._failing:
            log.warning("rate limits are on again")
            self._failing = False
        return math.ceil(wait) if wait else 0.0

    def _take(self, key: str) -> float:
        path = self._path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:  # swept while we waited for the lock: open anew
                    continue
                now = time.monotonic()
                raw = os.pread(fd, self._STATE.size, 0)
                tokens, last = self._STATE.unpack(raw) if len(raw) == self._STATE.size else (self.burst, now)
                if not (math.isfinite(tokens) and last <= now):  # torn, or from before a reboot
                    tokens, last = self.burst, now
                tokens = min(self.burst, tokens + (now - last) * self.rate)
                wait = 0.0
                if tokens >= 1.0:
                    tokens -= 1.0
                else:
                    wait = (1.0 - tokens) / self.rate
                os.pwrite(fd, self._STATE.pack(tokens, now), 0)
                return wait
            finally:
                os.close(fd)  # releases the lock

    def sweep(self) -> int:
        """Remove buckets untouched long enough to be full again (revoked and idle tokens);
        returns how many. Each is removed under its lock, so a take waiting on it starts anew."""
        cutoff = time.time() - self.idle_s
        n = 0
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return 0
        for e in entries:
            try:
                if e.stat().st_mtime >= cutoff:
                    continue
                fd = os.open(e.path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink and os.fstat(fd).st_mtime < cutoff:
                    os.unlink(e.path)
                    n += 1
            except OSError:
                pass
            finally:
                os.close(fd)
        return n


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


class Scheduler(Protocol):
    """What the routes ask of the background runner (``api.runner.Runner``): to schedule."""

    def submit_ingest(self, photo_id: str, tenant_id: str | None = None) -> Future[None] | None: ...

    def submit_job(self, job_id: str) -> Future[None] | None: ...

    def shutdown(self) -> None: ...


@dataclass
class Services:
    settings: Settings
    factory: sessionmaker[Session]
    vault: Vault
    limiter: RateLimiter
    tokens: TokenCache = field(default_factory=TokenCache)
    runner: Scheduler | None = None  # api.runner.Runner, set at start-up
