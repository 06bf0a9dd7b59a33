"""Queue names and the task name: the one source of truth for where jobs go.

A job for capability ``sast`` in region ``us-east-1`` is published to the queue
``sast.us-east-1``; an agent consumes ``<cap>.<REGION>`` for each of its
capabilities. Both functions are pure.
"""
from __future__ import annotations

from .config import CAPABILITIES

__all__ = ["RUN_SCAN", "queue_for", "queues_for", "parse_queue", "route_task"]

#: Name of the Celery task every scan job is published as.
RUN_SCAN = "exploop.run_scan"


def queue_for(capability: str, region: str) -> str:
    """Return the queue that carries ``capability`` jobs for ``region``."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; valid: {', '.join(CAPABILITIES)}")
    if not region or "." in region:
        raise ValueError(f"invalid region {region!r}")
    return f"{capability}.{region}"


def parse_queue(queue: str) -> tuple[str, str]:
    """``sast.us-east-1`` -> (``sast``, ``us-east-1``): the inverse of :func:`queue_for`."""
    capability, _, region = queue.partition(".")
    return capability, region


def queues_for(capabilities, region: str) -> list[str]:
    """Return the queues an agent with these capabilities in ``region`` consumes."""
    return [queue_for(cap, region) for cap in capabilities]


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router: scan jobs go to the queue of their capability and region."""
    if name == RUN_SCAN and kwargs:
        return {"queue": queue_for(kwargs["capability"], kwargs["region"])}
    return None
