"""Claims that die with their process: a photo being anonymised or a job running is *leased*.

A claim writes ``lease_holder`` (host, pid, a random tag) and ``lease_until`` (now + LEASE_S) in
the row's own conditional UPDATE; while the work goes on a thread of the holding process pushes
``lease_until`` forward every BEAT_S. A process killed with -9 stops beating, so its leases
expire within LEASE_S, and any running server takes the rows back (api/runner.py, every
RECOVER_EVERY_S and at start-up). A holder on this host whose pid is gone is taken as expired at
once, so a restart does not wait for the lease. The beat never touches ``updated_at`` (the
API's ETags and the stale-row rules read it).

A holder that loses its lease (it stalled for LEASE_S and another process took the row) learns
it at its next beat (``Lease.lost``) or when it publishes: every final write is conditional on
``lease_holder`` still being its own, so a row is never finished twice.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a claim not renewed for this long is taken back
BEAT_S = 5.0  # how often a holder renews it
RECOVER_EVERY_S = 5.0  # how often a running server looks for expired claims

_holder: tuple[int, str] | None = None


def holder() -> str:
    """This process's holder name: ``host:pid:tag`` (a new one after a fork)."""
    global _holder
    pid = os.getpid()
    if _holder is None or _holder[0] != pid:
        _holder = (pid, f"{socket.gethostname()[:48]}:{pid}:{secrets.token_hex(4)}")
    return _holder[1]


def until() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=LEASE_S)


def claim_values() -> dict[str, Any]:
    """The columns a claiming UPDATE sets, besides the state."""
    return {"lease_holder": holder(), "lease_until": until()}


def _dead_here(name: str | None) -> bool:
    """A holder on this host whose process no longer exists."""
    if not name:
        return True
    host, _, rest = name.partition(":")
    if host != socket.gethostname()[:48]:
        return False
    try:
        pid = int(rest.split(":", 1)[0])
    except ValueError:
        return True
    if pid == os.getpid():
        return name != holder()  # our pid, another tag: a process before us with the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def gone(name: str | None, lease_until: datetime | None) -> bool:
    """Whether a claim's holder is gone: its lease ran out (or it has none: claimed before
    leases existed), or it was a process of this host that no longer exists."""
    if lease_until is not None and lease_until.tzinfo is None:  # SQLite hands back naive UTC
        lease_until = lease_until.replace(tzinfo=UTC)
    return lease_until is None or lease_until < datetime.now(UTC) or _dead_here(name)


def takeable(db: Session, model: Any, state: str) -> list[tuple[str, str | None]]:
    """(id, holder) of the rows in ``state`` whose holder is gone."""
    rows = db.execute(select(model.id, model.lease_holder, model.lease_until).where(model.state == state)).all()
    return [(rid, name) for rid, name, lease_until in rows if gone(name, lease_until)]


def held_by(model: Any, name: str | None) -> ColumnElement[bool]:
    """The row still has the holder seen (None included): nobody claimed it since."""
    return model.lease_holder.is_(None) if name is None else model.lease_holder == name


def mine(model: Any) -> ColumnElement[bool]:
    return and_(model.lease_holder == holder())


class Lease:
    """The renewal of one claimed row, from a daemon thread of the holding process."""

    def __init__(self, factory: sessionmaker[Session], model: Any, row_id: str) -> None:
        self.factory, self.model, self.row_id = factory, model, row_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{row_id[:8]}", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _beat(self) -> None:
        m = self.model
        while not self._stop.wait(BEAT_S):
            try:
                with self.factory.begin() as db:
                    n = db.execute(
                        update(m)
                        .where(m.id == self.row_id, m.lease_holder == holder())
                        .values(lease_until=until(), updated_at=m.updated_at)
                        .execution_options(synchronize_session=False)
                    ).rowcount  # type: ignore[attr-defined]
            except Exception as exc:  # a busy database: try again at the next beat
                log.warning("lease renewal of %s failed (%s)", self.row_id[:8], type(exc).__name__)
                continue
            if not n:
                self.lost.set()
                return

    def release(self) -> None:
        """Stop renewing and clear the claim (the row's state is the caller's business)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=BEAT_S + 5)
        m = self.model
        try:
            with self.factory.begin() as db:
                db.execute(
                    update(m)
                    .where(m.id == self.row_id, m.lease_holder == holder())
                    .values(lease_holder=None, lease_until=None, updated_at=m.updated_at)
                    .execution_options(synchronize_session=False)
                )
        except Exception as exc:  # the lease then just expires
            log.warning("lease release of %s failed (%s)", self.row_id[:8], type(exc).__name__)
