"""Every Prometheus metric, defined once.

API metrics: counters and histograms in the default registry (multiprocess-safe
under gunicorn when PROMETHEUS_MULTIPROC_DIR is set, as ``exploop api`` does),
plus gauges computed at scrape time from the database and Redis (queue depth,
jobs by status, agents by status and region, capacity).

Agent metrics: ``AgentMetrics`` builds them in the agent's own registry, all in
the worker's main process: job outcomes come back from the prefork children
with each task's result, so no count is lost in a child.
"""
from __future__ import annotations

import os
import time

from prometheus_client import (REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily

__all__ = ["REQUEST_LATENCY", "JOB_DURATION", "QUEUE_WAIT", "STALE_CLAIMS", "JOBS_FINISHED", "SECURITY_EVENTS",
           "render_api_metrics", "AgentMetrics", "FleetCollector"]

_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

REQUEST_LATENCY = Histogram(
    "exploop_api_request_duration_seconds", "API request latency by endpoint and status class.",
    ["endpoint", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
JOB_DURATION = Histogram(
    "exploop_job_duration_seconds", "Time from claim to completion or failure of a job attempt.",
    ["capability", "region", "outcome"], buckets=_DURATION_BUCKETS)
QUEUE_WAIT = Histogram(
    "exploop_job_queue_wait_seconds", "Time a job attempt waited queued before an agent claimed it.",
    ["capability", "region"], buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, 3600))
STALE_CLAIMS = Counter(
    "exploop_stale_claims_total", "Claims refused because the delivery was stale or a duplicate.",
    ["capability", "region"])
SECURITY_EVENTS = Counter(
    "exploop_security_events_total", "Authentication failures, access denials and invalid tokens.",
    ["kind", "audience"])
JOBS_FINISHED = Counter(
    "exploop_jobs_finished_total", "Jobs that reached a final state.", ["capability", "region", "status"])


class FleetCollector:
    """Scrape-time gauges from the database and Redis (the source of truth, not counters)."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        from sqlalchemy import func, select

        from .extensions import db
        from .fleet import describe_agents
        from .models import JOB_STATUSES, Agent, Job
        from .routing import queues_for

        with self.app.app_context():
            jobs = GaugeMetricFamily("exploop_jobs", "Jobs by status.", labels=["status"])
            counts = dict(db.session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in JOB_STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
            yield jobs

            views = describe_agents(db.session.scalars(select(Agent)).all())
            agents = GaugeMetricFamily("exploop_agents", "Agents by status and region.",
                                       labels=["status", "region"])
            running = GaugeMetricFamily("exploop_capacity_jobs_running", "Jobs running, by region.",
                                        labels=["region"])
            capacity = GaugeMetricFamily("exploop_capacity_jobs_max",
                                         "Job slots of online agents, by region.", labels=["region"])
            by_key: dict[tuple, int] = {}
            slots: dict[str, list[int]] = {}
            queues = set(self.app.extensions["celery"].amqp.queues.keys())
            for view in views:
                by_key[(view["status"], view["region"])] = by_key.get((view["status"], view["region"]), 0) + 1
                used, total = slots.setdefault(view["region"], [0, 0])
                if view["status"] in ("online", "draining"):
                    slots[view["region"]][0] += view["jobs_running"]
                if view["status"] == "online":
                    slots[view["region"]][1] += view["max_jobs"]
                queues.update(queues_for(view["capabilities"], view["region"]))
            for (status, region), n in sorted(by_key.items()):
                agents.add_metric([status, region], n)
            for region, (used, total) in sorted(slots.items()):
                running.add_metric([region], used)
                capacity.add_metric([region], total)
            yield agents
            yield running
            yield capacity
            db.session.remove()

            depth = GaugeMetricFamily("exploop_queue_depth", "Messages waiting in each broker queue.",
                                      labels=["queue"])
            for queue, n in self.app.extensions["brokers"].depths(queues).items():
                if n is not None:
                    depth.add_metric([queue], n)
            yield depth


def render_api_metrics(app) -> bytes:
    """The API's /metrics body: process metrics (all gunicorn workers) + fleet gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    fleet = CollectorRegistry()
    fleet.register(FleetCollector(app))
    return body + generate_latest(fleet)


class _ProcessTreeCPU:
    """CPU seconds of the agent and its live worker and scanner processes."""

    def __init__(self, labels: dict):
        self.labels = labels

    def collect(self):
        import psutil
        from prometheus_client.core import CounterMetricFamily

        me = psutil.Process()
        total = sum(me.cpu_times()[:2])
        for child in me.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        family = CounterMetricFamily("exploop_agent_cpu_seconds", "CPU seconds used by the agent's processes "
                                     "(live ones: the counter may drop when a worker process is replaced).",
                                     labels=list(self.labels))
        family.add_metric(list(self.labels.values()), total)
        yield family


class AgentMetrics:
    """The runbook's agent metrics, labelled ``agent_name`` and ``region``, served on :9100."""

    def __init__(self, agent_name: str, region: str):
        self.registry = CollectorRegistry()
        labels = {"agent_name": agent_name, "region": region}
        names = list(labels)

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=self.registry).labels(**labels)

        self.status = gauge("exploop_agent_status", "1 when the agent holds a valid lease, else 0.")
        self.draining = gauge("exploop_agent_draining", "1 while the agent is drained (takes no new jobs).")
        self.jobs_running = gauge("exploop_agent_jobs_running", "Jobs running on this agent.")
        self.max_jobs = gauge("exploop_agent_max_jobs", "Jobs this agent runs at most at once.")
        self.lease_ttl = gauge("exploop_agent_lease_ttl_seconds", "Seconds left on this agent's lease.")
        self.memory_bytes = gauge("exploop_agent_memory_bytes",
                                "Memory of the agent and its worker and scanner processes (PSS: pages shared by the "
                                "forked pool counted once, as the container's limit counts them).")
        self.memory_limit = gauge("exploop_agent_memory_limit_bytes",
                                  "Memory limit the agent runs under (0: none known).")
        self.completed = Counter("exploop_agent_jobs_completed_total", "Jobs this agent completed.",
                                 names, registry=self.registry).labels(**labels)
        self.failed = Counter("exploop_agent_jobs_failed_total", "Job attempts that failed on this agent.",
                              names, registry=self.registry).labels(**labels)
        self.skipped = Counter("exploop_agent_deliveries_skipped_total",
                               "Stale or duplicate deliveries this agent skipped (claim refused).",
                               names, registry=self.registry).labels(**labels)
        self.heartbeat_latency = Histogram(
            "exploop_agent_heartbeat_latency_seconds", "Lease renewal round trip to the API.", names,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry,
        ).labels(**labels)
        self.registry.register(_ProcessTreeCPU(labels))
        self.started = time.time()

    def record_outcome(self, outcome: str) -> None:
        """Count a task's result as the main process receives it from the pool."""
        if outcome == "completed":
            self.completed.inc()
        elif outcome == "failed":
            self.failed.inc()
        elif outcome == "skipped":
            self.skipped.inc()
