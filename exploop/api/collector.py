"""The API's /metrics: its own counters (every gunicorn worker's) plus fleet gauges read at
scrape time from the database and Redis (the source of truth, not counters)."""
from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from ..core import fleet
from ..core.extensions import db
from ..core.jobs import status_counts
from ..routing import queues_for
from ..vocabulary import AGENT_STATUSES, JOB_STATUSES, AgentStatus

__all__ = ["FleetCollector", "render_api_metrics", "STOPPED"]

#: ``exploop_agents`` status of an agent that is offline because it stopped gracefully.
STOPPED = "stopped"


class FleetCollector:
    """Scrape-time gauges from the database and Redis (the source of truth, not counters)."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        with self.app.app_context():
            jobs = GaugeMetricFamily("exploop_jobs", "Jobs by status.", labels=["status"])
            for status, n in status_counts(statuses=JOB_STATUSES).items():
                jobs.add_metric([status], n)
            yield jobs

            snapshot = fleet.fleet_snapshot()
            agents = GaugeMetricFamily("exploop_agents", "Agents by status and region.",
                                       labels=["status", "region"])
            running = GaugeMetricFamily("exploop_capacity_jobs_running", "Jobs running, by region.",
                                        labels=["region"])
            capacity = GaugeMetricFamily("exploop_capacity_jobs_max",
                                         "Job slots of online agents, by region.", labels=["region"])
            by_key: dict[tuple, int] = {}
            slots: dict[str, list[int]] = {}
            queues = set(self.app.extensions["celery"].amqp.queues.keys())
            consumers: dict[str, int] = {}
            for kind, totals in snapshot.kinds.items():
                # A graceful stop shows `offline` to operators; the gauge tells it apart so that
                # PlatformAgentsOfflineByLease (status="offline") pages only for lost agents.
                for status, n in ((kind.status, totals.agents - totals.stopped), (STOPPED, totals.stopped)):
                    by_key[(status, kind.region)] = by_key.get((status, kind.region), 0) + n
                for queue in queues_for([c for c in kind.capabilities.split(",") if c], kind.region):
                    consumers[queue] = consumers.get(queue, 0) + (totals.agents if kind.status == AgentStatus.ONLINE else 0)
                used_total = slots.setdefault(kind.region, [0, 0])
                if kind.status in (AgentStatus.ONLINE, AgentStatus.DRAINING, AgentStatus.STOPPING):
                    used_total[0] += totals.jobs_running
                used_total[1] += totals.capacity  # online agents' slots
            queues.update(consumers)
            # Every status for every region, zeros included: alert rules match on them.
            for region in sorted(slots):
                for status in (*AGENT_STATUSES, STOPPED):
                    agents.add_metric([status, region], by_key.get((status, region), 0))
            for region, (used, total) in sorted(slots.items()):
                running.add_metric([region], used)
                capacity.add_metric([region], total)
            yield agents
            yield running
            yield capacity
            # No guess when the leases could not be read (a fleet of disabled agents needs none).
            redis_unreadable = any(kind.status == AgentStatus.UNKNOWN for kind in snapshot.kinds)
            if not redis_unreadable:
                family = GaugeMetricFamily("exploop_queue_consumers",
                                           "Online agents consuming each queue (0 with jobs waiting: nobody"
                                           " will run them).", labels=["queue"])
                for queue in sorted(queues):
                    family.add_metric([queue], consumers.get(queue, 0))
                yield family
            db.session.remove()
            if redis_unreadable:
                return  # no depth rather than a scrape held for Redis' retries

            depth = GaugeMetricFamily("exploop_queue_depth", "Messages waiting in each broker queue.",
                                      labels=["queue"])
            for queue, n in self.app.extensions["brokers"].depths(queues).items():
                if n is not None:  # its broker is unreachable
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
