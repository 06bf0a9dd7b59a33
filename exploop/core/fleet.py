"""Agents: registration, credentials, leases and the status operators see.

Status is derived, never stored: ``online`` = lease present and desired state
active; ``draining`` = lease present and desired state draining; ``stopping`` =
lease present and the agent announced a graceful stop; ``offline`` = no lease
(crashed, cut off, or stopped: ``stopped_at`` says which); ``disabled`` = switched
off by an admin; ``unknown`` = Redis could not be read (the views then come from the
database alone). Running jobs are counted from the job records, never from a lease body.

Each start of an agent is an incarnation: an id sent with every renewal and claim.
A new one means the previous process is gone, so the jobs it held are requeued at
once; so is a job the agent reports it lost (a pool child that died mid-job).
"""
from __future__ import annotations

import logging
import secrets as _secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, Protocol, cast

import redis
from flask import current_app
from sqlalchemy import func, select, update
from sqlalchemy.engine import CursorResult

from ..config import parse_duration
from ..vocabulary import AgentStatus, DesiredState, JobStatus
from . import jobs
from .exceptions import ApiError
from .extensions import db
from .models import Agent, AuditEvent, BootstrapToken, Job, utcnow
from .security import AGENT_PREFIX, BOOTSTRAP_PREFIX, hash_token, new_token, security_event

logger = logging.getLogger(__name__)

__all__ = ["agent_status", "presence_status", "fleet_snapshot", "FleetSnapshot", "FleetKind",
           "describe_agents", "fleet_view", "running_jobs", "register_agent", "create_agent",
           "renew_lease", "renew_lease_cached", "forget_agent", "lease_ttl", "release_lease",
           "create_bootstrap_token", "token_status", "audit", "LAST_SEEN_WRITE_INTERVAL"]

#: The lease lives in Redis; the database copy of last_seen is refreshed at most this often.
LAST_SEEN_WRITE_INTERVAL = timedelta(seconds=60)


def audit(actor: str, action: str, target: str | None = None, detail: str | None = None) -> None:
    """Record an admin action (committed with the caller's transaction)."""
    db.session.add(AuditEvent(actor=actor, action=action, target=target, detail=detail))


class AgentRecord(Protocol):
    """What the status needs of an agent: a model or a row of these columns."""

    name: str
    disabled: bool
    desired_state: str


def agent_status(agent: AgentRecord, lease: dict | None) -> str:
    """The status operators see, from the record and the lease (see the module docstring)."""
    if agent.disabled:
        return AgentStatus.DISABLED
    if lease is None:
        return AgentStatus.OFFLINE
    if lease.get("status") == AgentStatus.STOPPING:
        return AgentStatus.STOPPING
    return AgentStatus.DRAINING if agent.desired_state == DesiredState.DRAINING else AgentStatus.ONLINE


def presence_status(agent: AgentRecord, live: dict[str, bool]) -> str:
    """:func:`agent_status` from lease presence (``LeaseStore.presence``: name -> stopping),
    with no lease body decoded."""
    stopping = live.get(agent.name)
    return agent_status(agent, None if stopping is None else {"status": AgentStatus.STOPPING} if stopping else {})


def running_jobs(agent_ids: list[int]) -> dict[int, list[str]]:
    """Ids of the jobs each agent runs now, from the job records (a lease body lags a heartbeat)."""
    query = select(Job.agent_id, Job.id).where(Job.status == JobStatus.RUNNING).order_by(Job.started_at, Job.id)
    if len(agent_ids) <= 1000:  # a page of agents; the whole fleet reads every running job
        query = query.where(Job.agent_id.in_(agent_ids))
    running: dict[int, list[str]] = {}
    for agent_id, job_id in db.session.execute(query):
        if agent_id is not None:
            running.setdefault(agent_id, []).append(job_id)
    return running


def _naive_utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


def fleet_view(agents: Sequence[Agent]) -> tuple[list[dict], str | None]:
    """Agent records joined with their leases (one pipelined Redis read) and running jobs.

    Returns the views and, when Redis cannot be read within FLEET_READ_TIMEOUT, a note
    saying what is unknown: the views then come from the database alone, with status
    ``unknown`` (except ``disabled``, an admin decision the database holds).
    """
    unknown = None
    try:
        leases, renewed = current_app.extensions["lease_reads"].read_fleet([a.name for a in agents])
    except redis.RedisError as exc:
        leases, renewed = {}, {}
        unknown = (f"Redis unreadable ({exc.__class__.__name__}): status and lease TTL unknown;"
                   " jobs, capacity and last seen from the database")
    jobs = running_jobs([a.id for a in agents])
    now = utcnow()
    views = []
    for agent in agents:
        lease = leases.get(agent.name)
        last_seen = agent.last_seen
        if agent.name in renewed:  # the last renewal itself, lease or not
            last_seen = max(filter(None, (last_seen, _naive_utc(renewed[agent.name]))))
        elif lease is not None:
            last_seen = _naive_utc(lease["renewed_at"])
        status = AgentStatus.UNKNOWN if unknown and not agent.disabled else agent_status(agent, lease)
        running = jobs.get(agent.id, [])
        views.append({
            "name": agent.name,
            "status": status,
            "region": agent.region,
            "capabilities": agent.capability_list,
            "jobs_running": len(running),
            "max_jobs": agent.max_jobs,
            "running_jobs": running,
            "desired_state": agent.desired_state,
            "stopped_at": agent.stopped_at if lease is None else None,
            "lease_ttl": lease["ttl"] if lease else None,
            "last_seen": last_seen,
            "last_seen_seconds": max(0, int((now - last_seen).total_seconds())) if last_seen else None,
            "version": (lease or {}).get("version") or agent.version,
            "host": (lease or {}).get("host") or agent.host,
            "nodename": (lease or {}).get("nodename") or agent.nodename,
            "created_at": agent.created_at,
        })
    return views, unknown


def describe_agents(agents: Sequence[Agent]) -> list[dict]:
    """Agent records joined with their leases and running jobs (see :func:`fleet_view`)."""
    return fleet_view(agents)[0]


def _unique_name(region: str) -> str:
    while True:
        name = f"agent-{region}-{_secrets.token_hex(3)}"
        if db.session.scalar(select(Agent.id).where(Agent.name == name)) is None:
            return name


def create_agent(name: str, region: str, capabilities: list[str], max_jobs: int,
                 **extra) -> tuple[Agent, str]:
    """Create an agent record and return it with its key (shown once)."""
    if db.session.scalar(select(Agent.id).where(Agent.name == name)) is not None:
        raise ApiError(409, f"agent {name!r} already exists")
    key = new_token(AGENT_PREFIX)
    agent = Agent(name=name, region=region, capabilities=",".join(dict.fromkeys(capabilities)),
                  max_jobs=max_jobs, key_hash=hash_token(key), **extra)
    db.session.add(agent)
    return agent, key


def token_status(token: BootstrapToken) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at <= utcnow():
        return "expired"
    if token.uses >= token.max_uses:
        return "used"
    return "valid"


def register_agent(data: dict) -> tuple[Agent, str]:
    """Exchange a bootstrap token for an agent record and its own key."""
    raw = data["token"]
    token = db.session.scalar(select(BootstrapToken).where(
        BootstrapToken.token_hash == hash_token(raw))) if raw.startswith(BOOTSTRAP_PREFIX) else None
    if token is None:
        security_event("invalid_token", "bootstrap", "reason=unknown")
        logger.warning("invalid bootstrap token: unknown token")
        raise ApiError(401, "invalid bootstrap token", {"reason": "unknown"})
    data = dict(data, region=data.get("region") or _auto_region(token))
    _check_constraints(token, data)
    # Spend one use atomically: concurrent registrations cannot exceed max_uses.
    spent = cast(CursorResult, db.session.execute(update(BootstrapToken).where(
        BootstrapToken.id == token.id, BootstrapToken.uses < BootstrapToken.max_uses,
        BootstrapToken.revoked_at.is_(None), BootstrapToken.expires_at > utcnow(),
    ).values(uses=BootstrapToken.uses + 1)))
    if spent.rowcount != 1:
        db.session.rollback()
        db.session.refresh(token)
        reason = token_status(token)
        security_event("invalid_token", "bootstrap", f"reason={reason} token={token.prefix}")
        logger.warning("invalid bootstrap token: %s token=%s", reason, token.prefix)
        raise ApiError(401, f"invalid bootstrap token: {reason}", {"reason": reason})
    name = data.get("name") or _unique_name(data["region"])
    agent, key = create_agent(name, data["region"], data["capabilities"], data["max_jobs"],
                              version=data.get("version"), host=data.get("host"))
    audit(f"bootstrap:{token.prefix}", "register agent", name)
    db.session.commit()
    logger.info("agent registered agent=%s region=%s capabilities=%s",
                name, agent.region, agent.capabilities)
    return agent, key


#: Region of an agent registered with REGION=auto on a server that knows no region yet.
DEFAULT_REGION = "default"


def _auto_region(token: BootstrapToken) -> str:
    """REGION=auto: the token's region, else the server's only region, else ``default``."""
    if token.region:
        return token.region
    regions = jobs.known_regions(include_disabled=True)
    if len(regions) > 1:
        raise ApiError(400, "region required: this server has several regions",
                       {"region": [f"set REGION to one of {', '.join(sorted(regions))}"]})
    return next(iter(regions), DEFAULT_REGION)


def _check_constraints(token: BootstrapToken, data: dict) -> None:
    """A token bound to a region or capabilities registers only agents within them."""
    problems = {}
    if token.region and data["region"] != token.region:
        problems["region"] = [f"this token only registers agents in {token.region!r}"]
    allowed = [c for c in (token.capabilities or "").split(",") if c]
    extra = sorted(set(data["capabilities"]) - set(allowed)) if allowed else []
    if extra:
        problems["capabilities"] = [f"this token only allows {', '.join(allowed)}; not {', '.join(extra)}"]
    if problems:
        security_event("access_denied", "bootstrap", f"token={token.prefix} {problems}")
        logger.warning("bootstrap token constraint refused token=%s region=%s capabilities=%s",
                       token.prefix, data["region"], ",".join(data["capabilities"]))
        raise ApiError(403, "registration outside the bootstrap token's constraints", problems)


def create_bootstrap_token(actor: str, max_uses: int, expires: str, region: str | None = None,
                           capabilities: list[str] | None = None,
                           description: str | None = None) -> tuple[BootstrapToken, str]:
    """Create a bootstrap token (optionally bound to a region and capabilities); shown once."""
    try:
        lifetime = parse_duration(expires, "expires")
    except ValueError as exc:
        raise ApiError(400, str(exc), {"expires": [str(exc)]}) from None
    raw = new_token(BOOTSTRAP_PREFIX)
    token = BootstrapToken(token_hash=hash_token(raw), prefix=raw[:len(BOOTSTRAP_PREFIX) + 6],
                           max_uses=max_uses, expires_at=utcnow() + timedelta(seconds=lifetime),
                           created_by=actor, region=region, description=description,
                           capabilities=",".join(capabilities) if capabilities else None)
    db.session.add(token)
    audit(actor, "create token", token.prefix, f"max_uses={max_uses} expires={expires}")
    db.session.commit()
    return token, raw


def lease_ttl(body: dict) -> float:
    """3 x the agent's heartbeat interval, within the configured bounds."""
    config = current_app.config
    ttl = 3 * body["heartbeat_interval"]
    return min(max(ttl, parse_duration(config["LEASE_TTL_MIN"])), parse_duration(config["LEASE_TTL_MAX"]))


def renew_lease_cached(key_hash: str, body: dict) -> dict | None:
    """The hot path: renew through the Redis identity cache, no database; None on a miss
    (and for a renewal that reports lost jobs, which the database path requeues)."""
    if body.get("lost_jobs"):
        return None
    body = {k: v for k, v in body.items() if k != "lost_jobs"}
    ttl = lease_ttl(body)
    identity = current_app.extensions["leases"].renew_by_key(key_hash, body, ttl)
    if identity is None:
        return None
    return {"agent": identity["name"], "desired_state": identity["desired_state"],
            "lease_ttl": int(round(ttl))}


def forget_agent(agent: Agent) -> None:
    """Invalidate the agent's cached identity after its record changed."""
    current_app.extensions["leases"].forget(agent.key_hash)


def renew_lease(agent: Agent, body: dict) -> dict:
    """Renew the agent's lease (TTL = 3 x its heartbeat interval) and return its desired state.

    This slow path reads and updates the record (last_seen at most once a
    minute), then caches the identity for a minute so the next renewals skip the
    database.
    """
    ttl = lease_ttl(body)
    leases = current_app.extensions["leases"]
    if body.get("incarnation"):
        jobs.adopt_incarnation(agent, body["incarnation"])
    jobs.requeue_lost(agent, body.get("lost_jobs") or [])
    body = {k: v for k, v in body.items() if k != "lost_jobs"}
    leases.renew(agent.name, body, ttl)
    now = utcnow()
    # max_jobs too: the record holds the one capacity figure every view shows (an agent's
    # MAX_CONCURRENT_JOBS may differ from what it was created with).
    changed = {k: body[k] for k in ("version", "host", "nodename", "max_jobs")
               if body.get(k) and body[k] != getattr(agent, k)}
    if agent.stopped_at is not None:
        agent.stopped_at = None
        db.session.commit()
    if changed or agent.last_seen is None or agent.lease_expired_at is not None \
            or now - agent.last_seen > LAST_SEEN_WRITE_INTERVAL:
        for key, value in changed.items():
            setattr(agent, key, value)
        if agent.lease_expired_at is not None:
            logger.info("agent back online agent=%s offline_since=%s", agent.name,
                        agent.lease_expired_at.isoformat())
        agent.last_seen, agent.lease_expired_at = now, None
        db.session.commit()
    leases.remember(agent.key_hash, {"name": agent.name, "desired_state": agent.desired_state},
                    LAST_SEEN_WRITE_INTERVAL.total_seconds())
    return {"agent": agent.name, "desired_state": agent.desired_state, "lease_ttl": int(round(ttl))}


def release_lease(agent: Agent) -> None:
    """A graceful stop: drop the lease, remember the agent stopped (no "lease expired" alert)."""
    current_app.extensions["leases"].release(agent.name)
    agent.stopped_at = utcnow()
    db.session.commit()
    logger.info("agent stopped agent=%s", agent.name)


class FleetKind(NamedTuple):
    """Agents of one region, capability set and status."""

    region: str
    capabilities: str
    status: str


class KindTotals:
    """What the fleet views add up over the agents of one :class:`FleetKind`."""

    __slots__ = ("agents", "capacity", "jobs_running", "slots_free", "stopped")

    def __init__(self) -> None:
        self.agents = 0
        self.stopped = 0  # offline agents that announced a graceful stop
        self.capacity = 0  # max_jobs summed over online agents
        self.jobs_running = 0  # running jobs (job records), whatever the status
        self.slots_free = 0  # max_jobs less running jobs, summed over online agents


class FleetSnapshot(NamedTuple):
    """The whole fleet as ``cluster-info``, the console's Fleet page and ``/metrics`` read it.

    Agents are added up by kind in one pass, so the views work on a few dozen totals, not on
    every agent.
    """

    agents: int
    kinds: dict[FleetKind, KindTotals]
    #: Running jobs per (region of their agent, capability), from the job records.
    jobs_running: dict[tuple[str, str], int]
    #: False when Redis could not be read: status, queue depths and consumers are unknown.
    leases_read: bool


def fleet_snapshot() -> FleetSnapshot:
    """Every agent's status, capacity and running jobs, added up by region, capabilities and status.

    Columns, not ORM objects, lease presence, not lease bodies (a stopping agent's lease says
    so in its first bytes), and running jobs from the job records (a lease body lags a
    heartbeat): one query and one MGET per 5,000 agents even for a fleet of thousands, and
    one grouped count of the running jobs.
    """
    agents = db.session.execute(select(Agent.id, Agent.name, Agent.region, Agent.capabilities,
                                       Agent.max_jobs, Agent.desired_state, Agent.disabled, Agent.stopped_at)).all()
    try:  # the short-timeout client: a hung Redis costs one FLEET_READ_TIMEOUT
        # Agent -> whether its lease says it is stopping (read from the body's first bytes).
        live: dict[str, bool] | None = current_app.extensions["lease_reads"].presence([a.name for a in agents])
    except redis.RedisError:
        live = None  # unreadable: report what the database knows rather than fail
    running: dict[int, dict[str, int]] = {}
    for agent_id, capability, n in db.session.execute(
            select(Job.agent_id, Job.capability, func.count()).where(Job.status == JobStatus.RUNNING)
            .group_by(Job.agent_id, Job.capability)):
        if agent_id is not None:
            running.setdefault(agent_id, {})[capability] = n
    kinds: dict[tuple[str, str, str], KindTotals] = {}
    jobs_running: dict[tuple[str, str], int] = {}
    for agent in agents:
        status: str
        if live is None:  # Redis unreadable: only "disabled" (the database holds it) is known
            status = AgentStatus.DISABLED if agent.disabled else AgentStatus.UNKNOWN
        else:
            status = presence_status(agent, live)
        key = (agent.region, agent.capabilities, status)
        totals = kinds.get(key)
        if totals is None:
            totals = kinds[key] = KindTotals()
        totals.agents += 1
        if status == AgentStatus.OFFLINE and agent.stopped_at is not None:
            totals.stopped += 1
        busy = 0
        held = running.get(agent.id)
        if held:
            for capability, n in held.items():
                jobs_running[(agent.region, capability)] = jobs_running.get((agent.region, capability), 0) + n
                busy += n
            totals.jobs_running += busy
        if status == AgentStatus.ONLINE:
            totals.capacity += agent.max_jobs
            totals.slots_free += max(0, agent.max_jobs - busy)
    return FleetSnapshot(len(agents), {FleetKind(*key): totals for key, totals in kinds.items()}, jobs_running,
                         live is not None)
