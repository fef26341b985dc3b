"""The metrics an operator alerts on, and the alert rules in deploy/prometheus/: promtool (the
tool Prometheus operators have) accepts the rules and passes their unit tests; every metric the
rules use is one /metrics exports; the new gauges say what they claim on a synthetic database."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from dataprotection.fields import new_project
from dataprotection.tenancy import create_contract, create_tenant
from dataprotection.vault import FileKeyStore
from siteplan import PIPELINE_VERSION
from siteplan.db import Job, init_db
from workers.metrics import ServiceCollector

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "siteplan-alerts.yaml"


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: the Debian package prometheus (Makefile SYS_TEST); run make test")
    return exe


def test_promtool_accepts_the_rules_and_their_unit_tests() -> None:
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 6 rules found" in check.stdout, check.stdout + check.stderr
    test = subprocess.run(
        [promtool(), "test", "rules", RULES.with_name("siteplan-alerts.test.yaml").name],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reg = CollectorRegistry()
    reg.register(ServiceCollector(init_db(url)))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_metric_the_rules_use_is_exported(tmp_path: Path) -> None:
    exported = {name for name, _ in scrape(f"sqlite:///{tmp_path / 'db.sqlite'}")} | {"siteplan_failed_jobs"}
    used = set(re.findall(r"\b(siteplan_[a-z_]+)", RULES.read_text()))
    assert used and used <= exported, used - exported


def test_queue_age_stuck_jobs_attempts_and_failures(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    factory = init_db(url)
    keys = FileKeyStore(tmp_path / "keys")
    now = datetime.now(UTC)
    with factory.begin() as db:
        t = create_tenant(db, keys, label="x")
        c = create_contract(db, keys, tenant_id=t.id)
        p = new_project(db, keys, tenant_id=t.id, contract_id=c.id, reference="p")

        def job(state: str, age_min: float, **kw: object) -> None:
            j = Job(
                tenant_id=t.id, project_id=p.id, state=state, pipeline_version=PIPELINE_VERSION, inputs={}, timings={},
                **kw,
            )  # fmt: skip
            db.add(j)
            db.flush()
            j.updated_at = now - timedelta(minutes=age_min)

        job("queued", 20)
        job("queued", 2)
        job("running", 40, stage="reconstruct", stage_attempts={"reconstruct": 3})
        job("running", 1, stage="plan", stage_attempts={"reconstruct": 1, "plan": 1})
        job("failed", 5, stage="reconstruct", stage_attempts={"reconstruct": 1})
        job("failed", 5, stage="plan", stage_attempts={"reconstruct": 1, "plan": 2})
    m = scrape(url)
    assert m[("siteplan_queue_oldest_seconds", (("kind", "job"),))] == pytest.approx(20 * 60, abs=30)
    assert m[("siteplan_queue_oldest_seconds", (("kind", "photo"),))] == 0
    assert m[("siteplan_running_job_idle_seconds", ())] == pytest.approx(40 * 60, abs=30)
    assert m[("siteplan_stage_attempts_total", (("stage", "reconstruct"),))] == 6
    assert m[("siteplan_stage_attempts_total", (("stage", "plan"),))] == 3
    assert m[("siteplan_failed_jobs", (("stage", "reconstruct"),))] == 1
    assert m[("siteplan_failed_jobs", (("stage", "plan"),))] == 1
