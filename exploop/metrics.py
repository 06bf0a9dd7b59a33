"""Every Prometheus metric, defined once.

API metrics: counters and histograms in the default registry (multiprocess-safe
under gunicorn when PROMETHEUS_MULTIPROC_DIR is set, as ``exploop api`` does),
(the gauges computed at scrape time from the database and Redis are served by
``exploop.api.collector``).

Agent metrics: ``AgentMetrics`` builds them in the agent's own registry, all in
the worker's main process: job outcomes come back from the prefork children
with each task's result, so no count is lost in a child.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

__all__ = ["REQUEST_LATENCY", "JOB_DURATION", "QUEUE_WAIT", "STALE_CLAIMS", "JOBS_FINISHED", "SECURITY_EVENTS",
           "UNSERVED_SUBMITS", "AgentMetrics"]

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
UNSERVED_SUBMITS = Counter(
    "exploop_jobs_unserved_submits_total",
    "Jobs submitted to a queue no agent consumes: reason no_agent (none registered serves it)"
    " or no_live_agent (registered ones all offline, draining).", ["capability", "region", "reason"])
JOBS_FINISHED = Counter(
    "exploop_jobs_finished_total", "Jobs that reached a final state.", ["capability", "region", "status"])


class _ProcessTreeCPU:
    """CPU seconds of the agent and its live worker and scanner processes."""

    def __init__(self, labels: dict):
        self.labels = labels

    def collect(self):
        import psutil  # agents only: the API and the controller import this module too
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
        self.disabled = gauge("exploop_agent_disabled", "1 while an admin has disabled the agent (its lease is"
                              " refused: exploop_agent_status is 0 by decision, not by fault).")
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
