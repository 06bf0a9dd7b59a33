"""The fleet's shared vocabulary (job statuses, agent states, finding severities), used by
the API, the agents, the scanners and the CLI alike.

``StrEnum`` members are their strings: they compare, hash, serialise to JSON and label
Prometheus metrics exactly as the plain values the API has always sent.
"""
from __future__ import annotations

from enum import StrEnum

__all__ = ["JobStatus", "DesiredState", "AgentStatus", "JOB_STATUSES",
           "UNFINISHED_STATUSES", "ADMITTED_STATUSES", "WAITING_STATUSES", "FINAL_STATUSES", "AGENT_STATUSES", "SEVERITIES"]


class JobStatus(StrEnum):
    """A job's lifecycle: pending -> queued -> running -> completed | failed | cancelled."""

    PENDING = "pending"  # accepted, waiting for the tenant's fair share
    QUEUED = "queued"  # published to its broker queue
    RUNNING = "running"  # claimed by one agent
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DesiredState(StrEnum):
    """What the admins want an agent to do; it applies the state at every renewal."""

    ACTIVE = "active"
    DRAINING = "draining"


class AgentStatus(StrEnum):
    """An agent as operators see it (from its lease and its record)."""

    ONLINE = "online"  # lease present, desired state active
    DRAINING = "draining"  # lease present, takes no new jobs
    DISABLED = "disabled"  # an admin decision: leases and claims refused
    STOPPING = "stopping"  # a graceful stop the agent announced, until it exits
    OFFLINE = "offline"  # no lease: crashed, cut off, or stopped
    UNKNOWN = "unknown"  # Redis unreadable: the lease, and so the status, is not known


#: Plain strings, for click choices, schema validation and the OpenAPI enum.
JOB_STATUSES = tuple(s.value for s in JobStatus)
UNFINISHED_STATUSES = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING)
#: Count toward a tenant plan's concurrency.
ADMITTED_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
#: Accepted and not started yet.
WAITING_STATUSES = (JobStatus.PENDING, JobStatus.QUEUED)
FINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
AGENT_STATUSES = tuple(s.value for s in AgentStatus)
#: Finding severities, most severe first.
SEVERITIES = ("critical", "high", "medium", "low", "info")
