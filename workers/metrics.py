"""Prometheus metrics of the service, computed from the metadata DB at scrape time, so every
server and worker process reports the same numbers: queue depth, stage durations, failures."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from siteplan.db import Job, Photo


class ServiceCollector(Collector):
    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | SummaryMetricFamily]:
        with self.factory() as db:
            jobs = dict(db.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            photos = dict(db.execute(select(Photo.state, func.count()).group_by(Photo.state)).all())
            done = db.scalars(select(Job.timings).where(Job.state == "done")).all()
            attempts = db.scalar(select(func.coalesce(func.sum(Job.attempts), 0))) or 0
        g = GaugeMetricFamily("siteplan_jobs", "Jobs by state (queued and running are the queue).", labels=["state"])
        for state in ("queued", "running", "done", "failed", "cancelled"):
            g.add_metric([state], float(jobs.get(state, 0)))
        yield g
        q = GaugeMetricFamily("siteplan_queue_depth", "Work waiting: queued jobs plus photos waiting for the gate.")
        q.add_metric([], float(jobs.get("queued", 0) + photos.get("quarantined", 0)))
        yield q
        p = GaugeMetricFamily("siteplan_photos", "Photos by state.", labels=["state"])
        for state in ("uploading", "quarantined", "anonymising", "anonymised", "rejected"):
            p.add_metric([state], float(photos.get(state, 0)))
        yield p
        f = CounterMetricFamily("siteplan_job_failures", "Jobs that ended failed.")
        f.add_metric([], float(jobs.get("failed", 0)))
        yield f
        a = CounterMetricFamily("siteplan_job_attempts", "Stage attempts started, retries included.")
        a.add_metric([], float(attempts))
        yield a
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
