"""What the console's Fleet page shows: region x capability placements and the last hour.

Built from the same snapshot as ``cluster-info`` (agent records, lease presence, running
jobs from the job records, queue depths from the broker), with the same status rule
(:func:`exploop.core.fleet.agent_status`), so the page and the CLI never disagree.
"""
from __future__ import annotations

from datetime import timedelta

from flask import current_app
from sqlalchemy import and_, case, func, or_, select

from ..config import CAPABILITIES
from ..core import fleet
from ..core.extensions import db
from ..core.models import Job, utcnow
from ..routing import queue_for
from ..vocabulary import AGENT_STATUSES, FINAL_STATUSES, UNFINISHED_STATUSES, WAITING_STATUSES

__all__ = ["placements", "hour_series", "sparkline"]



def placements(snapshot: fleet.FleetSnapshot, depths: dict[str, int | None] | None = None) -> list[dict]:
    """One row per (region, capability) that has agents, a queue or waiting jobs.

    ``snapshot`` is :func:`exploop.core.fleet.fleet_snapshot`'s (shared with the summary):
    statuses from lease presence, slots used from the running job records (as ``cluster-info``
    counts them), slots free = an online agent's ``max_jobs`` less its running jobs.
    ``depths`` are queue depths already read (``cluster-info``'s ``queues``); only the queues
    they lack are read, and none when the leases were unreadable (Redis is, then, too).
    ``problem`` is set when jobs wait there and no live agent consumes the queue.
    """
    rows: dict[tuple[str, str], dict] = {}

    def row(region: str, capability: str) -> dict:
        found = rows.get((region, capability))
        if found is None:
            found = rows[(region, capability)] = {
                "region": region, "capability": capability, **dict.fromkeys(AGENT_STATUSES, 0),
                "slots_used": 0, "slots_free": 0, "depth": None, "waiting": 0, "oldest_wait": None}
        return found

    for kind, totals in snapshot.kinds.items():
        for capability in [c for c in kind.capabilities.split(",") if c]:
            r = row(kind.region, capability)
            r[kind.status] += totals.agents
            r["slots_free"] += totals.slots_free
    for (region, capability), n in snapshot.jobs_running.items():
        row(region, capability)["slots_used"] += n
    now = utcnow()
    waiting = db.session.execute(select(Job.region, Job.capability, func.count(), func.min(Job.created_at))
                                 .where(Job.status.in_(WAITING_STATUSES)).group_by(Job.region, Job.capability)).all()
    for region, capability, count, oldest in waiting:
        r = row(region, capability)
        r["waiting"], r["oldest_wait"] = count, int((now - oldest).total_seconds())
    for region in current_app.config["REGIONS"].split(","):
        if region.strip():
            for capability in CAPABILITIES:
                if (region.strip(), capability) not in rows:
                    row(region.strip(), capability)
    depths = dict(depths or {})
    missing = [queue_for(c, r) for r, c in rows if queue_for(c, r) not in depths]
    if missing and snapshot.leases_read:
        depths.update(current_app.extensions["brokers"].depths(missing))  # None where a broker is unreachable
    for (region, capability), r in rows.items():
        r["depth"] = depths.get(queue_for(capability, region))
        r["queue"] = queue_for(capability, region)
        r["problem"] = (bool(r["depth"]) or r["waiting"] > 0) and r["online"] == 0
    return sorted(rows.values(), key=lambda r: (not r["problem"], r["region"], r["capability"]))


def hour_series(buckets: int = 12) -> dict:
    """Jobs finished and jobs waiting over the last hour, in ``buckets`` steps, from job records.

    Waiting at an instant = created before it and neither started nor finished by then (a
    requeued job counts from its last start). The database sums both series in one pass
    each over the jobs active within the hour ((status, finished_at) index), so the page
    never reads the history, nor the waiting jobs themselves, into the API.
    """
    now = utcnow()
    start = now - timedelta(hours=1)
    step = timedelta(hours=1) / buckets
    edges = [start + step * (i + 1) for i in range(buckets)]
    finished = db.session.execute(select(*[
        func.coalesce(func.sum(case((Job.finished_at < edge, 1), else_=0)), 0) for edge in edges]).where(
        Job.status.in_(FINAL_STATUSES), Job.finished_at >= start)).one()
    throughput = [int(finished[0])] + [int(finished[i]) - int(finished[i - 1]) for i in range(1, buckets)]
    waiting = db.session.execute(select(*[
        func.coalesce(func.sum(case((and_(Job.created_at <= t, or_(Job.started_at.is_(None), Job.started_at > t),
                                          or_(Job.finished_at.is_(None), Job.finished_at > t)), 1), else_=0)), 0)
        for t in edges]).where(or_(Job.status.in_(UNFINISHED_STATUSES),
                                   and_(Job.status.in_(FINAL_STATUSES), Job.finished_at >= start)))).one()
    return {"throughput": throughput, "waiting": [int(n) for n in waiting],
            "step_minutes": int(step.total_seconds() // 60)}


def sparkline(values: list[int], width: int = 240, height: int = 48) -> dict:
    """Points of an SVG polyline for ``values`` (server-side chart: no script, no library)."""
    top = max(values) if values and max(values) > 0 else 1
    n = max(1, len(values) - 1)
    points = " ".join(f"{i * width / n:.1f},{height - v * (height - 4) / top - 2:.1f}"
                      for i, v in enumerate(values))
    return {"points": points, "max": max(values) if values else 0, "last": values[-1] if values else 0,
            "width": width, "height": height}
