"""Several hosts starting at once migrate one PostgreSQL database safely: each start takes an
advisory lock (siteplan.db.MIGRATION_LOCK) for its schema change, so they take turns and the
later ones find the schema at head. Tested with real OS processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from siteplan.db import MIGRATION_LOCK, alembic_config

ROOT = Path(__file__).resolve().parents[2]
# What a host does at start (siteplan serve, any siteplan command): migrate, then say where it is.
START = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from alembic.runtime.migration import MigrationContext
from siteplan.db import make_engine, migrate
engine = make_engine(sys.argv[1])
migrate(engine)
with engine.connect() as c:
    print(MigrationContext.configure(c).get_current_revision())
"""


def start_host(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", START, url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def head() -> str:
    h = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert h
    return h


def applied(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Running upgrade" in line]


def test_two_hosts_migrating_at_once_take_turns(pg_url: str) -> None:
    # Hold the lock as a migrating host would, so both start while it is taken: a real overlap.
    holder = create_engine(pg_url).connect()
    holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
    try:
        hosts = [start_host(pg_url) for _ in range(2)]
        deadline = time.monotonic() + 60
        while True:  # both are waiting on the lock, not past it
            waiting = holder.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar()
            if waiting == 2:
                break
            assert all(h.poll() is None for h in hosts), [h.communicate() for h in hosts]
            assert time.monotonic() < deadline, "the hosts did not wait on the migration lock"
            time.sleep(0.1)
    finally:
        holder.rollback()  # releases the lock: the hosts go one after the other
        holder.close()
    outs = [h.communicate(timeout=120) for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], [err[-2000:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == [head(), head()]
    # Exactly one of them changed the schema; the other found it at head under the lock.
    runs = sorted(len(applied(err)) for _, err in outs)
    assert runs[0] == 0 and runs[1] >= 4, runs
    assert all("waiting for it" in err for _, err in outs)
    with create_engine(pg_url).connect() as c:
        assert MigrationContext.configure(c).get_current_revision() == head()
        assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_hosts_racing_on_a_fresh_database_all_start(pg_url: str) -> None:
    hosts = [start_host(pg_url) for _ in range(3)]
    outs = [h.communicate(timeout=120) for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert sum(1 for _, err in outs if applied(err)) == 1
