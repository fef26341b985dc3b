"""A small batch for the reprocessing tests: N projects with a finished plan each, and a light
stage (a Ray-free stand-in for a plan job) that writes a result keyed by its inputs."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dataprotection.fields import new_project
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore
from siteplan.db import Job, Subject, init_db
from workers.reprocess import claim, driver_lock, result_key, run_batch, select_projects


def build(db_url: str, keys_dir: Path, n: int) -> None:
    factory = init_db(db_url)
    keys = FileKeyStore(keys_dir)
    with factory.begin() as db:
        t = create_tenant(db, keys, label="Batch")
        c = create_contract(db, keys, tenant_id=t.id)
        for i in range(n):
            s = Subject(tenant_id=t.id, contract_id=c.id, name_enc="x")
            db.add(s)
            db.flush()
            p = new_project(db, keys, tenant_id=t.id, contract_id=c.id, subject_id=s.id, reference=f"P{i}")
            db.add(
                Job(
                    tenant_id=t.id,
                    project_id=p.id,
                    kind="plan",
                    state="done",
                    pipeline_version="old",
                    inputs={"i": i},
                    timings={},
                )
            )


def light_process(factory: sessionmaker[Session], results: Path, delay: float):  # type: ignore[no-untyped-def]
    def process(job_id: str) -> None:
        j = claim(factory, job_id)
        if j is None:
            return
        time.sleep(delay)
        key = result_key(j.project_id, j.inputs, j.pipeline_version)
        tmp = results / f".tmp-{key}-{os.getpid()}"
        tmp.write_text(json.dumps({"project": j.project_id, "job": j.id}))
        os.replace(tmp, results / f"{key}.json")  # a retry replaces it: never a second result
        with factory.begin() as db:
            row = db.get(Job, job_id)
            assert row is not None
            row.state = "done"

    return process


def main(db_url: str, results: str, version: str, delay: float) -> None:
    factory = init_db(db_url)
    with factory() as db:
        sel = select_projects(db, version=version)
    with driver_lock(Path(results).parent / "reprocess.lock"):
        summary = run_batch(factory, sel, light_process(factory, Path(results), delay), sole_driver=True)
    print(json.dumps(summary.to_json()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
