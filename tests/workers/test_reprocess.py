"""Batch reprocessing: resumable after the driver is killed, exactly once, consent re-checked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from siteplan.db import Contract, Job, Project, Subject, init_db
from tests.workers.batch_helper import build, light_process
from workers.reprocess import run_batch, select_projects

ROOT = Path(__file__).parents[2]


def test_driver_killed_halfway_then_restarted_does_every_project_once(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    build(db_url, tmp_path / "keys", 100)
    results = tmp_path / "results"
    results.mkdir()
    cmd = [sys.executable, "-m", "tests.workers.batch_helper", db_url, str(results), "v2", "0.03"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(results.glob("*.json"))) < 40:  # let it get about half way
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_first = len(list(results.glob("*.json")))
    assert 40 <= done_first < 100
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    factory = init_db(db_url)
    with factory() as db:
        v2 = db.scalars(select(Job).where(Job.pipeline_version == "v2")).all()
    per_project: dict[str, int] = {}
    for j in v2:
        assert j.state == "done", (j.state, j.error)
        per_project[j.project_id] = per_project.get(j.project_id, 0) + 1
    assert len(per_project) == 100 and set(per_project.values()) == {1}, "a project was processed twice"
    assert len(list(results.glob("*.json"))) == 100 and not list(results.glob(".tmp-*"))
    # The restart counted what the first run had finished as skipped, and did the rest.
    assert summary["skipped"].get("already done at this version", 0) >= done_first - 1
    assert summary["skipped"].get("already done at this version", 0) + summary["done"] == 100


def test_consent_checked_between_selection_and_processing(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    build(db_url, tmp_path / "keys", 6)
    factory = init_db(db_url)
    with factory() as db:
        sel = select_projects(db, version="v2")
        assert len(sel.todo) == 6
    # After selection: one client restricts processing; the dry-run selection would now skip it.
    with factory.begin() as db:
        p = db.scalars(select(Project).order_by(Project.created_at, Project.id)).first()
        assert p is not None
        db.get(Subject, p.subject_id).restricted = True  # type: ignore[union-attr]
        restricted_project = p.id
    results = tmp_path / "r"
    results.mkdir()
    summary = run_batch(factory, sel, light_process(factory, results, 0.0))
    assert summary.done == 5 and summary.refused == {"client restricted": 1}
    with factory() as db:
        j = db.scalars(select(Job).where(Job.project_id == restricted_project, Job.pipeline_version == "v2")).one()
        assert j.state == "cancelled"
        # Then the contract ends: a new selection skips everything, and nothing runs.
        project = db.get(Project, restricted_project)
        assert project is not None
        contract = db.get(Contract, project.contract_id)
        assert contract is not None
        contract.state = "ended"
        db.commit()
        sel2 = select_projects(db, version="v3")
    assert sel2.todo == [] and sel2.skipped["contract not active"] == 6
