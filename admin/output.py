"""Rendering for ``exploop-admin``: the runbook's aligned tables, describe pages, JSON and YAML.

Every function here is pure: API documents in, text out. The commands decide
what goes to stdout (results) and what to stderr (diagnostics).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import yaml

from exploop.config import format_duration

__all__ = ["LIST_FORMATS", "DOC_FORMATS", "Kind", "KINDS", "render_list", "render_doc",
           "table", "fields", "describe_agent", "describe_job", "describe_cluster", "age"]

#: ``-o`` choices of ``get``; describe and action commands print text or one document.
LIST_FORMATS = ("table", "wide", "json", "yaml")
DOC_FORMATS = ("text", "json", "yaml")

_NONE = "<none>"
#: Label column of describe pages: ``Jobs:         3/10`` (the runbook greps that line).
_LABEL_WIDTH = 14


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _now() -> datetime:
    return datetime.now(UTC)


def age(value: str | None, now: datetime | None = None) -> str:
    """``12s``, ``4m``, ``2h`` since an ISO timestamp; ``<none>`` without one."""
    moment = _parse_time(value)
    if moment is None:
        return _NONE
    return format_duration(((now or _now()) - moment).total_seconds())


def _when(value: str | None, now: datetime | None = None) -> str:
    """``2026-01-26T10:00:00Z (5m ago)`` for describe pages."""
    if not value:
        return _NONE
    return f"{value} ({age(value, now)} ago)"


def _expires(value: str | None, now: datetime | None = None) -> str:
    moment = _parse_time(value)
    if moment is None:
        return "never"
    left = (moment - (now or _now())).total_seconds()
    return f"in {format_duration(left)}" if left > 0 else f"{format_duration(-left)} ago"


def _text(value) -> str:
    if value is None or value == "" or value == []:
        return _NONE
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return " ".join(str(value).split())  # one line per row, whatever the value holds


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, three spaces apart, like kubectl's tables."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [headers, *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("   ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def fields(pairs: list[tuple[str, object]], indent: int = 0) -> str:
    """``Label:        value`` lines with the values in one column."""
    pad = " " * indent
    width = max([_LABEL_WIDTH - indent] + [len(label) + 2 for label, _ in pairs])
    return "".join(f"{pad}{(label + ':').ljust(width)}{value}\n" for label, value in pairs)


def to_json(doc) -> str:
    return json.dumps(doc, indent=2) + "\n"


def to_yaml(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False)


def render_doc(doc, fmt: str) -> str:
    """One JSON or YAML document."""
    if fmt == "json":
        return to_json(doc)
    if fmt == "yaml":
        return to_yaml(doc)
    raise ValueError(f"not a document format: {fmt}")


# --- list kinds ---------------------------------------------------------------------

Column = tuple[str, Callable[[dict], str]]


@dataclass(frozen=True)
class Kind:
    """A resource ``get`` lists: its name, its table columns and its extra ``-o wide`` ones."""

    plural: str
    columns: tuple[Column, ...]
    wide: tuple[Column, ...] = ()


def _jobs_load(agent: dict) -> str:
    return f"{agent['jobs_running']}/{agent['max_jobs']}"


def _last_seen(agent: dict) -> str:
    seconds = agent.get("last_seen_seconds")
    return "never" if seconds is None else format_duration(seconds)


def _lease_ttl(agent: dict) -> str:
    ttl = agent.get("lease_ttl")
    return _NONE if ttl is None else f"{ttl}s"


def _short(value, limit: int = 60) -> str:
    text = _text(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


KINDS: dict[str, Kind] = {
    "agents": Kind("agents", (
        ("NAME", lambda a: a["name"]),
        ("STATUS", lambda a: a["status"]),
        ("REGION", lambda a: a["region"]),
        ("JOBS", _jobs_load),
        ("LAST SEEN", _last_seen),
    ), (
        ("CAPABILITIES", lambda a: _text(a["capabilities"])),
        ("DESIRED", lambda a: a["desired_state"]),
        ("LEASE TTL", _lease_ttl),
        ("VERSION", lambda a: _text(a.get("version"))),
        ("HOST", lambda a: _text(a.get("host"))),
    )),
    "jobs": Kind("jobs", (
        ("ID", lambda j: j["id"]),
        ("STATUS", lambda j: j["status"]),
        ("TENANT", lambda j: j["tenant"]),
        ("CAPABILITY", lambda j: j["capability"]),
        ("REGION", lambda j: j["region"]),
        ("AGENT", lambda j: _text(j.get("agent"))),
        ("ATTEMPT", lambda j: f"{j['attempt']}/{j['max_attempts']}"),
        ("AGE", lambda j: age(j["created_at"])),
    ), (
        ("PROGRESS", lambda j: f"{j['progress']}%"),
        ("REPO", lambda j: j["repo_url"]),
        ("REF", lambda j: j["ref"]),
        ("ERROR", lambda j: _short(j.get("error"))),
    )),
    "tokens": Kind("tokens", (
        ("ID", lambda t: str(t["id"])),
        ("PREFIX", lambda t: t["prefix"]),
        ("STATUS", lambda t: t["status"]),
        ("USES", lambda t: f"{t['uses']}/{t['max_uses']}"),
        ("EXPIRES", lambda t: _expires(t["expires_at"])),
        ("AGE", lambda t: age(t["created_at"])),
    ), (
        ("CREATED BY", lambda t: _text(t.get("created_by"))),
        ("EXPIRES AT", lambda t: t["expires_at"]),
        ("REGION", lambda t: _text(t.get("region"))),
        ("CAPABILITIES", lambda t: ",".join(t.get("capabilities") or []) or "-"),
        ("DESCRIPTION", lambda t: _text(t.get("description"))),
        ("REVOKED AT", lambda t: _text(t.get("revoked_at"))),
        ("REVOKED BY", lambda t: _text(t.get("revoked_by"))),
        ("REASON", lambda t: _text(t.get("revoke_reason"))),
    )),
    "tenants": Kind("tenants", (
        ("NAME", lambda t: t["name"]),
        ("ID", lambda t: str(t["id"])),
        ("PLAN", lambda t: t.get("plan", "")),
        ("AGE", lambda t: age(t["created_at"])),
    ), (
        ("CREATED", lambda t: t["created_at"]),
    )),
    "admin-tokens": Kind("admin tokens", (
        ("ID", lambda t: str(t["id"])),
        ("NAME", lambda t: t["name"]),
        ("ROLE", lambda t: t["role"]),
        ("STATUS", lambda t: t["status"]),
        ("AGE", lambda t: age(t["created_at"])),
    ), (
        ("CREATED", lambda t: t["created_at"]),
        ("REVOKED AT", lambda t: _text(t.get("revoked_at"))),
    )),
    "audit": Kind("audit events", (
        ("TIME", lambda e: e["created_at"]),
        ("ACTOR", lambda e: e["actor"]),
        ("ACTION", lambda e: e["action"]),
        ("TARGET", lambda e: _text(e.get("target"))),
        ("DETAIL", lambda e: _short(e.get("detail"), 80)),
    ), (
        ("ID", lambda e: str(e["id"])),
    )),
}


def render_list(kind: str, items: list[dict], total: int, fmt: str) -> str:
    """A ``get`` result: the table (``table``/``wide``) or one JSON/YAML document."""
    if fmt in ("json", "yaml"):
        return render_doc({"items": items, "total": total}, fmt)
    spec = KINDS[kind]
    columns = spec.columns + (spec.wide if fmt == "wide" else ())
    return table([h for h, _ in columns], [[get(item) for _, get in columns] for item in items])


# --- describe pages -------------------------------------------------------------------

def describe_agent(agent: dict) -> str:
    """``exploop-admin describe agent``: one agent's state, load, lease and recent jobs."""
    out = fields([
        ("Name", agent["name"]),
        ("Status", agent["status"] + (f" (stopped {_when(agent['stopped_at'])})"
                                       if agent.get("stopped_at") and agent["status"] == "offline" else "")),
        ("Desired", agent["desired_state"]),
        ("Region", agent["region"]),
        ("Capabilities", _text(agent["capabilities"])),
        ("Jobs", _jobs_load(agent)),
        ("Running", _text(agent.get("running_jobs"))),
        ("Lease TTL", _lease_ttl(agent)),
        ("Last Seen", "never" if agent.get("last_seen") is None else
         f"{agent['last_seen']} ({_last_seen(agent)} ago)"),
        ("Version", _text(agent.get("version"))),
        ("Host", _text(agent.get("host"))),
        ("Node", _text(agent.get("nodename"))),
        ("Created", _when(agent.get("created_at"))),
    ])
    # Only the load line says "Jobs": the runbook waits for a drain with `| grep Jobs`.
    recent = agent.get("recent_jobs") or []
    if not recent:
        return out + fields([("History", _NONE)])
    rows = [[j["id"], j["status"], j["capability"], j["tenant"], str(j["attempt"]),
             age(j.get("started_at")), age(j.get("finished_at"))] for j in recent]
    body = table(["ID", "STATUS", "CAPABILITY", "TENANT", "ATTEMPT", "STARTED", "FINISHED"], rows)
    return out + "History:\n" + "".join(f"  {line}\n" for line in body.splitlines())


def _block(value: str | None) -> str:
    """A multi-line value (an error with its traceback) with its lines under the value column."""
    if not value:
        return _NONE
    lines = str(value).rstrip().splitlines()
    return "\n".join([lines[0]] + [" " * _LABEL_WIDTH + line for line in lines[1:]])


def _duration(start: str | None, end: str | None) -> str:
    first, last = _parse_time(start), _parse_time(end)
    if first is None:
        return _NONE
    return format_duration(((last or _now()) - first).total_seconds()) + ("" if last else " so far")


SEVERITY_ORDER = ("critical", "high", "medium", "low", "info")


def _job_agent(job: dict) -> str:
    agent = job.get("agent")
    if agent and job["status"] in ("pending", "queued"):
        return f"{_NONE} (last ran on {agent})"
    return _text(agent)


def describe_job(job: dict) -> str:
    """``exploop-admin describe job``: status, attempts, agent, timings, progress, error, findings."""
    progress = f"{job['progress']}%"
    if job.get("progress_message") and job["status"] not in ("pending", "queued"):
        progress += f" ({_text(job['progress_message'])})"
    out = fields([
        ("ID", job["id"]),
        ("Status", job["status"]),
        ("Tenant", job["tenant"]),
        ("Capability", job["capability"]),
        ("Region", job["region"]),
        ("Queue", f"{job['capability']}.{job['region']}"),
        ("Repository", job["repo_url"]),
        ("Ref", job["ref"]),
        ("Attempt", f"{job['attempt']}/{job['max_attempts']}"),
        ("Agent", _job_agent(job)),
        ("Progress", progress),
        ("Created", _when(job.get("created_at"))),
        ("Queued", _when(job.get("queued_at"))),
        ("Started", _when(job.get("started_at"))),
        ("Finished", _when(job.get("finished_at"))),
        ("Waited", _duration(job.get("created_at"), job.get("started_at"))),
        ("Ran", _duration(job.get("started_at"), job.get("finished_at"))),
        ("Error", _block(job.get("error"))),
    ])
    if job.get("incomplete"):
        out += fields([("Incomplete", _block("\n".join(
            f"{i.get('path')} ({i.get('ecosystem') or 'unknown'}): not checked: {i.get('reason')}"
            for i in job["incomplete"])))])
    summary = job.get("summary") or {}
    by_severity = summary.get("by_severity")
    if by_severity is None:
        return out + fields([("Findings", _NONE)])
    total = summary.get("findings", sum(by_severity.values()))
    names = [s for s in SEVERITY_ORDER if s in by_severity] + \
        sorted(s for s in by_severity if s not in SEVERITY_ORDER)
    return out + fields([("Findings", total)]) + fields(
        [(name.capitalize(), by_severity[name]) for name in names], indent=2)


def describe_cluster(info: dict, api_url: str) -> str:
    """``exploop-admin cluster-info``: dependencies, agents, capacity, queues and jobs."""
    agents, capacity, jobs = info["agents"], info["capacity"], info["jobs"]
    by_status = ", ".join(f"{count} {status}" for status, count in sorted(agents["by_status"].items()))
    used, total = capacity["used"], capacity["total"]
    percent = f" ({100 * used // total}%)" if total else ""
    out = fields([
        ("API", f"{info['api']} ({api_url}, version {info.get('version', _NONE)})"),
        ("Database", info["database"]),
        ("Redis", info["redis"]),
        ("Agents", f"{agents['total']}" + (f" ({by_status})" if by_status else "")),
        ("Capacity", f"{used}/{total} job slots in use{percent}"),
    ])
    regions = agents["by_region"]
    if regions:
        statuses = ["online", "draining", "stopping", "offline", "disabled"]
        if any(r.get("unknown") for r in regions.values()):
            statuses.append("unknown")
        rows = [[name, *(str(r.get(s, 0)) for s in statuses), f"{r['jobs_running']}/{r['capacity']}"]
                for name, r in sorted(regions.items())]
        out += "\n" + table(["REGION", *(s.upper() for s in statuses), "JOBS"], rows)
    queues = info["queues"]
    consumers = info.get("consumers") or {}
    unconsumed = set(info.get("unconsumed") or ())
    if queues:
        rows = [[name, "unknown" if depth is None else str(depth),
                 "unknown" if consumers.get(name) is None else str(consumers[name]),
                 "NO CONSUMER" if name in unconsumed else ""]
                for name, depth in sorted(queues.items())]
        out += "\n" + table(["QUEUE", "DEPTH", "CONSUMERS", ""], rows)
    out += "\nJobs:\n" + fields([
        ("Pending", jobs["pending"]),
        ("Queued", jobs["queued"]),
        ("Running", jobs["running"]),
        ("Failed (24h)", jobs["failed_24h"]),
        ("Completed (24h)", jobs["completed_24h"]),
    ], indent=2)
    return out


def describe_tenant(tenant: dict) -> str:
    """``describe tenant``: plan, limits and usage."""
    limits, usage = tenant["limits"], tenant["usage"]
    rows = [("Name:", tenant["name"]), ("Plan:", tenant["plan"]),
            ("Concurrent:", f"{usage['concurrent']}/{limits['max_concurrent']} (queued + running)"),
            ("Waiting:", f"{usage['waiting']}/{limits['max_queue']} (pending + queued)"),
            ("Running:", str(usage["running"])), ("Queued:", str(usage["queued"])),
            ("Pending:", str(usage["pending"])), ("Created:", tenant["created_at"])]
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)
