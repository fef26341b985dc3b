"""Prometheus metrics of the service, computed from the metadata DB at scrape time, so every
server and worker process reports the same numbers: queue depth and age, stage durations,
attempts and failures, jobs that stopped moving. docs/operations.md lists them with the alert
rules in deploy/prometheus/siteplan-alerts.yaml."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from siteplan.db import Job, Photo
from siteplan.states import JobState, PhotoState


class ServiceCollector(Collector):
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
        with self.factory() as db:
            jobs = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            photos = dict(db.execute(select(Photo.state, func.count()).group_by(Photo.state)).all())
            done = db.scalars(select(Job.timings).where(Job.state == JobState.DONE)).all()
            attempts = db.scalar(select(func.coalesce(func.sum(Job.attempts), 0))) or 0
            # Waiting since the row last changed (a retried job is queued again with its old id).
            oldest_job = db.scalar(select(func.min(Job.updated_at)).where(Job.state == JobState.QUEUED))
            oldest_photo = db.scalar(select(func.min(Photo.updated_at)).where(Photo.state == PhotoState.QUARANTINED))
            stalest = db.scalar(select(func.min(Job.updated_at)).where(Job.state == JobState.RUNNING))
            per_stage = db.scalars(select(Job.stage_attempts)).all()
            failed = select(Job.stage, func.count()).where(Job.state == JobState.FAILED)
            failed_at = dict(db.execute(failed.group_by(Job.stage)).all())
        now = datetime.now(UTC)
        g = GaugeMetricFamily("siteplan_jobs", "Jobs by state (queued and running are the queue).", labels=["state"])
        for state in JobState:
            g.add_metric([state], float(jobs.get(state, 0)))
        yield g
        q = GaugeMetricFamily("siteplan_queue_depth", "Work waiting: queued jobs plus photos waiting for the gate.")
        q.add_metric([], float(jobs.get("queued", 0) + photos.get("quarantined", 0)))
        yield q
        p = GaugeMetricFamily("siteplan_photos", "Photos by state.", labels=["state"])
        for photo_state in PhotoState:
            p.add_metric([photo_state], float(photos.get(photo_state, 0)))
        yield p
        f = CounterMetricFamily("siteplan_job_failures", "Jobs that ended failed.")
        f.add_metric([], float(jobs.get("failed", 0)))
        yield f
        a = CounterMetricFamily("siteplan_job_attempts", "Stage attempts started, retries included.")
        a.add_metric([], float(attempts))
        yield a
        age = GaugeMetricFamily(
            "siteplan_queue_oldest_seconds", "How long the oldest waiting job or photo has waited.", labels=["kind"]
        )
        age.add_metric(["job"], _age(now, oldest_job))
        age.add_metric(["photo"], _age(now, oldest_photo))
        yield age
        idle = GaugeMetricFamily(
            "siteplan_running_job_idle_seconds",
            "The longest a running job's row has gone unchanged (stage and progress updates): a stuck job grows it.",
        )
        idle.add_metric([], _age(now, stalest))
        yield idle
        sa = CounterMetricFamily(
            "siteplan_stage_attempts",
            "Stage task attempts by stage (a retry after a lost worker or node counts).",
            labels=["stage"],
        )
        counts: dict[str, int] = {}
        for d in per_stage:
            for stage, n in (d or {}).items():
                if isinstance(n, int):
                    counts[stage] = counts.get(stage, 0) + n
        for stage in sorted(set(counts) | {"anonymise", "reconstruct", "plan"}):
            sa.add_metric([stage], float(counts.get(stage, 0)))
        yield sa
        fs = GaugeMetricFamily("siteplan_failed_jobs", "Failed jobs by the stage they failed in.", labels=["stage"])
        for stage, n in sorted((str(k or "none"), v) for k, v in failed_at.items()):
            fs.add_metric([stage], float(n))
        yield fs
        s = SummaryMetricFamily("siteplan_stage_seconds", "Duration of finished jobs' stages.", labels=["stage"])
        sums: dict[str, tuple[int, float]] = {}
        for t in done:
            for stage, sec in (t or {}).items():
                if isinstance(sec, (int, float)):
                    n, tot = sums.get(stage, (0, 0.0))
                    sums[stage] = (n + 1, tot + float(sec))
        for stage, (n, tot) in sorted(sums.items()):
            s.add_metric([stage], count_value=n, sum_value=tot)
        yield s


def _age(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:  # SQLite hands timestamps back without their zone: they are UTC
        then = then.replace(tzinfo=UTC)
    return max(0.0, (now - then).total_seconds())
