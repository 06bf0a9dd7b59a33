"""Admin endpoints (``/admin/v1/*``), the API behind ``exploop-admin``.

Reads need a ``viewer`` or ``admin`` token; changes need ``admin``. Every change
is written to the audit log.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import redis
from flask import current_app, g
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from .. import __version__
from ..core import fleet, jobs
from ..core.exceptions import ApiError
from ..core.extensions import db
from ..core.models import AdminToken, Agent, AuditEvent, BootstrapToken, Job, Tenant, utcnow
from ..core.security import ADMIN_PREFIX, TENANT_PREFIX, hash_token, new_token
from ..routing import parse_queue, queue_for, queues_for
from ..vocabulary import AgentStatus, DesiredState, JobStatus
from . import Blueprint
from .auth import admin_required
from .health import check_dependencies
from .schemas import (
    AdminJobListArgs,
    AdminJobOut,
    AdminJobPage,
    AdminTokenCreate,
    AdminTokenCreated,
    AdminTokenOut,
    AdminTokenPage,
    AgentCreate,
    AgentCreated,
    AgentDetailOut,
    AgentDisabledOut,
    AgentListArgs,
    AgentOut,
    AgentPage,
    AuditListArgs,
    AuditPage,
    ClusterInfoOut,
    Extended,
    PageArgs,
    TenantCreate,
    TenantCreated,
    TenantPage,
    TenantUpdate,
    TenantUsage,
    TokenCreate,
    TokenCreated,
    TokenOut,
    TokenPage,
    TokenRevoke,
)
from .tenants import paged, with_queue_positions

logger = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin/v1",
               description="Fleet administration (admin token: radmin_...)")

#: Jobs shown with ``GET /admin/v1/agents/<name>`` (``exploop-admin describe agent``).
RECENT_JOBS = 10


def _agent(name: str) -> Agent:
    agent = db.session.scalar(select(Agent).where(Agent.name == name))
    if agent is None:
        raise ApiError(404, f"agent {name!r} not found")
    return agent


# --- tenants ------------------------------------------------------------------

@bp.post("/tenants")
@bp.arguments(TenantCreate())
@bp.response(201, TenantCreated)
@bp.errors(409)
@admin_required("admin")
def create_tenant(data):
    """Create a tenant on a plan (default: DEFAULT_PLAN); its API key is shown once."""
    if db.session.scalar(select(Tenant.id).where(Tenant.name == data["name"])) is not None:
        raise ApiError(409, f"tenant {data['name']!r} already exists")
    plan = _known_plan(data.get("plan") or current_app.config["DEFAULT_PLAN"])
    key = new_token(TENANT_PREFIX)
    tenant = Tenant(name=data["name"], key_hash=hash_token(key), plan=plan)
    db.session.add(tenant)
    fleet.audit(g.admin.name, "create tenant", data["name"], f"plan={plan}")
    db.session.commit()
    return Extended(tenant, api_key=key)


def _known_plan(plan: str) -> str:
    plans = current_app.config["PLANS"]
    if plan not in plans:
        # 409, not 400: the request is well formed; this server's configured plans differ.
        raise ApiError(409, f"unknown plan {plan!r}", {"plan": [f"valid: {', '.join(plans)}"]})
    return plan


def _tenant(name: str) -> Tenant:
    tenant = db.session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise ApiError(404, f"tenant {name!r} not found")
    return tenant


def tenant_usage(tenant: Tenant, counts: dict[str, int] | None = None) -> Extended:
    """A tenant with its plan's limits and its usage against them (``counts``: its
    ``jobs.status_counts``, when already read)."""
    counts = counts if counts is not None else jobs.status_counts(tenant.id)
    usage = {"running": counts[JobStatus.RUNNING], "queued": counts[JobStatus.QUEUED],
             "pending": counts[JobStatus.PENDING]}
    usage["concurrent"] = usage["running"] + usage["queued"]
    usage["waiting"] = usage["pending"] + usage["queued"]
    return Extended(tenant, limits=jobs.plan_limits(tenant), usage=usage)


@bp.get("/tenants/<name>")
@bp.response(200, TenantUsage)
@bp.errors(404)
@admin_required()
def get_tenant(name):
    """One tenant with its plan's limits and its usage against them."""
    return tenant_usage(_tenant(name))


@bp.patch("/tenants/<name>")
@bp.arguments(TenantUpdate())
@bp.response(200, TenantUsage)
@bp.errors(404, 409)
@admin_required("admin")
def update_tenant(data, name):
    """Move a tenant to another plan (takes effect for the next admissions)."""
    tenant = _tenant(name)
    old, tenant.plan = tenant.plan, _known_plan(data["plan"])
    fleet.audit(g.admin.name, "change plan", name, f"{old} -> {tenant.plan}")
    db.session.commit()
    jobs.admit_pending(tenant.id)
    return tenant_usage(tenant)


@bp.get("/tenants")
@bp.arguments(PageArgs(), location="query")
@bp.response(200, TenantPage)
@admin_required()
def list_tenants(args):
    """List tenants."""
    return tenants_page(args)


def tenants_page(args: dict) -> dict:
    """One page of tenants, by name."""
    return paged(select(Tenant).order_by(Tenant.name), args)


# --- bootstrap tokens -----------------------------------------------------------

def _token_view(record: BootstrapToken, **extra) -> Extended:
    return Extended(record, status=fleet.token_status(record), **extra)


@bp.post("/tokens")
@bp.arguments(TokenCreate(), required=False)
@bp.response(201, TokenCreated)
@admin_required("admin")
def create_token(data):
    """Create a bootstrap token (``--max-uses``, ``--expires``); shown once."""
    token, raw = fleet.create_bootstrap_token(g.admin.name, data["max_uses"], data["expires"],
                                              region=data.get("region"), capabilities=data.get("capabilities"),
                                              description=data.get("description"))
    return _token_view(token, token=raw)


@bp.get("/tokens")
@bp.arguments(PageArgs(), location="query")
@bp.response(200, TokenPage)
@admin_required()
def list_tokens(args):
    """List bootstrap tokens (never their values)."""
    return tokens_page(args)


def tokens_page(args: dict) -> dict:
    """One page of bootstrap tokens, newest first, with their status."""
    page = paged(select(BootstrapToken).order_by(BootstrapToken.id.desc()), args)
    page["items"] = [_token_view(t) for t in page["items"]]
    return page


@bp.post("/tokens/<int(max=2147483647):token_id>/revoke")
@bp.arguments(TokenRevoke(), required=False)
@bp.response(200, TokenOut)
@bp.errors(404)
@admin_required("admin")
def revoke_token(data, token_id):
    """Revoke a bootstrap token (recording who and why): registrations with it are refused."""
    return revoke_bootstrap_token(token_id, g.admin.name, data.get("reason"))


def revoke_bootstrap_token(token_id: int, actor: str, reason: str | None) -> Extended:
    """Revoke a bootstrap token once (revoking it again changes nothing)."""
    token = db.session.get(BootstrapToken, token_id)
    if token is None:
        raise ApiError(404, f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at, token.revoked_by = utcnow(), actor
        token.revoke_reason = reason
        fleet.audit(actor, "revoke token", token.prefix, reason)
        db.session.commit()
    return _token_view(token)


# --- agents ---------------------------------------------------------------------

@bp.post("/agents")
@bp.arguments(AgentCreate())
@bp.response(201, AgentCreated)
@bp.errors(409)
@admin_required("admin")
def create_agent(data):
    """Create an agent record with a pre-assigned key (shown once)."""
    agent, key = fleet.create_agent(data["name"], data["region"], data["capabilities"], data["max_jobs"])
    fleet.audit(g.admin.name, "create agent", agent.name,
                f"region={agent.region} capabilities={agent.capabilities} max_jobs={agent.max_jobs}")
    db.session.commit()
    return dict(fleet.describe_agents([agent])[0], api_key=key)


@bp.get("/agents")
@bp.arguments(AgentListArgs(), location="query")
@bp.response(200, AgentPage)
@admin_required()
def list_agents(args):
    """Agents with their live status (lease), running jobs (job records) and capacity, by name.

    When Redis cannot be read, the page comes from the database alone and ``degraded``
    says what is unknown.
    """
    return agents_page(args)


def agents_page(args: dict) -> dict:
    """One page of agents (filters: region, capability, name substring, status) with their
    leases and running jobs; ``degraded`` says what is unknown when Redis cannot be read."""
    query = select(Agent).order_by(Agent.name)
    if args.get("region"):
        query = query.where(Agent.region == args["region"])
    if args.get("capability"):
        # Stored comma separated: match the whole word, never a prefix of another capability.
        query = query.where(("," + Agent.capabilities + ",").contains(f",{args['capability']},"))
    if args.get("name"):
        query = query.where(Agent.name.contains(args["name"], autoescape=True))
    if args.get("status"):  # one of AGENT_STATUSES (the schema checks)
        status = args["status"]
        try:
            return _agents_with_status(query, args, status)
        except redis.RedisError:
            pass
        # Redis unreadable: the views say so (status unknown); filter the whole fleet, then page.
        views, unknown = fleet.fleet_view(db.session.scalars(query).all())
        views = [v for v in views if v["status"] == status]
        start = (args["page"] - 1) * args["per_page"]
        return _agent_page(views[start:start + args["per_page"]], len(views), args, unknown)
    page = paged(query, args)
    views, unknown = fleet.fleet_view(page["items"])
    return _agent_page(views, page["total"], args, unknown)


def _agent_page(views: list[dict], total: int, args: dict, unknown: str | None) -> dict:
    page = {"items": views, "page": args["page"], "per_page": args["per_page"], "total": total}
    if unknown:
        page["degraded"] = unknown
    return page


def _agents_with_status(query, args: dict, status: str) -> dict:
    """A page of agents in one status: narrow the fleet by the columns the status rule reads,
    apply the rule with lease presence (one MGET, nothing decoded; a stopping agent's lease
    says so in its first bytes), then describe only the page."""
    query = query.where(Agent.disabled.is_(status == AgentStatus.DISABLED))
    if status in (AgentStatus.ONLINE, AgentStatus.DRAINING):
        query = query.where(Agent.desired_state == DesiredState.DRAINING if status == AgentStatus.DRAINING
                            else Agent.desired_state != DesiredState.DRAINING)
    rows = db.session.execute(query.with_only_columns(Agent.name, Agent.disabled, Agent.desired_state)).all()
    live = current_app.extensions["lease_reads"].presence([r.name for r in rows])
    names = [r.name for r in rows if fleet.presence_status(r, live) == status]
    start = (args["page"] - 1) * args["per_page"]
    shown = names[start:start + args["per_page"]]
    records = db.session.scalars(select(Agent).where(Agent.name.in_(shown)).order_by(Agent.name)).all()
    views, unknown = fleet.fleet_view(records)
    return _agent_page(views, len(names), args, unknown)


@bp.get("/agents/<name>")
@bp.response(200, AgentDetailOut)
@bp.errors(404)
@admin_required()
def get_agent(name):
    """One agent with its lease, running jobs, state and the jobs it ran most recently."""
    return agent_detail(name)


def agent_detail(name: str) -> dict:
    """``describe agent``: the agent's view plus its most recent jobs."""
    views, unknown = fleet.fleet_view([_agent(name)])
    view = views[0]
    if unknown:
        view["degraded"] = unknown
    recent = (select(Job).options(selectinload(Job.tenant)).where(Job.agent_name == name)
              .order_by(func.coalesce(Job.started_at, Job.created_at).desc(), Job.id)
              .limit(RECENT_JOBS))
    view["recent_jobs"] = db.session.scalars(recent).all()
    return view


def set_desired_state(name: str, state: str, actor: str) -> dict:
    """Drain (``draining``) or uncordon (``active``) an agent, and tell its worker at once."""
    agent = _agent(name)
    agent.desired_state = state
    fleet.audit(actor, "drain agent" if state == DesiredState.DRAINING else "uncordon agent", name)
    db.session.commit()
    fleet.forget_agent(agent)
    view = fleet.describe_agents([agent])[0]
    _broadcast_queues(agent, view.get("nodename"), state)
    return view


def _broadcast_queues(agent: Agent, nodename: str | None, state: str) -> None:
    """Tell the agent's worker at once (the lease re-applies it if this is lost)."""
    if not nodename:
        return
    control = current_app.extensions["brokers"].for_region(agent.region).celery.control
    try:
        for queue in queues_for(agent.capability_list, agent.region):
            if state == DesiredState.DRAINING:
                control.cancel_consumer(queue, destination=[nodename])
            else:
                control.add_consumer(queue, destination=[nodename])
    except Exception as exc:  # the next lease renewal applies the state anyway
        logger.warning("remote control to %s failed: %s", nodename, exc)


@bp.post("/agents/<name>/drain")
@bp.response(200, AgentOut)
@bp.errors(404)
@admin_required("admin")
def drain_agent(name):
    """Stop the agent taking new jobs; running jobs finish."""
    return set_desired_state(name, DesiredState.DRAINING, g.admin.name)


@bp.post("/agents/<name>/uncordon")
@bp.response(200, AgentOut)
@bp.errors(404)
@admin_required("admin")
def uncordon_agent(name):
    """Let a drained agent take jobs again."""
    return set_desired_state(name, DesiredState.ACTIVE, g.admin.name)


def set_disabled(name: str, disabled: bool, actor: str) -> dict:
    """Disable (the hard switch) or enable an agent, audited under ``actor``, and tell its worker.

    The view returned carries ``requeued_jobs``: how many running jobs a disable requeued.
    """
    agent = _agent(name)
    # Forget the cached identity before and after, so no renewal slips through the cache.
    fleet.forget_agent(agent)
    agent.disabled = disabled
    fleet.audit(actor, "disable agent" if disabled else "enable agent", name)
    db.session.commit()
    fleet.forget_agent(agent)
    requeued = 0
    if disabled:
        # The hard switch (drain is the graceful one): its jobs go to other agents now, its
        # reports and claims are refused, and its worker stops consuming at once.
        requeued = jobs.requeue_running(agent, f"agent {name} disabled by {actor}")
        current_app.extensions["leases"].release(agent.name)
        logger.warning("agent disabled agent=%s by=%s requeued_jobs=%d", name, actor, requeued)
    else:
        logger.info("agent enabled agent=%s by=%s", name, actor)
    view = fleet.describe_agents([agent])[0]
    _broadcast_queues(agent, agent.nodename, "draining" if disabled else agent.desired_state)
    return dict(view, requeued_jobs=requeued)


@bp.post("/agents/<name>/disable")
@bp.response(200, AgentDisabledOut)
@bp.errors(404)
@admin_required("admin")
def disable_agent(name):
    """Switch an agent off: its lease and claims are refused (403 "disabled"), its running
    jobs are requeued at once, and it takes no job until enabled."""
    return set_disabled(name, True, g.admin.name)


@bp.post("/agents/<name>/enable")
@bp.response(200, AgentOut)
@bp.errors(404)
@admin_required("admin")
def enable_agent(name):
    """Switch a disabled agent back on: it takes jobs again from its next renewal."""
    return set_disabled(name, False, g.admin.name)


@bp.delete("/agents/<name>")
@bp.response(204)
@bp.errors(404)
@admin_required("admin")
def delete_agent(name):
    """Delete an agent record: its key stops working on its next request."""
    remove_agent(name, g.admin.name)


def remove_agent(name: str, actor: str) -> None:
    """Delete an agent record, requeueing its running jobs and dropping its lease."""
    agent = _agent(name)
    # Forget the cached identity before and after the delete, so no renewal can slip in.
    fleet.forget_agent(agent)
    requeued = jobs.requeue_running(agent, f"agent {name} deleted")
    current_app.extensions["leases"].release(agent.name)
    db.session.delete(agent)
    fleet.audit(actor, "delete agent", name, f"requeued_jobs={requeued}")
    db.session.commit()
    fleet.forget_agent(agent)
    current_app.extensions["leases"].release(agent.name)
    current_app.extensions["leases"].forget_renewals(agent.name)


# --- jobs -----------------------------------------------------------------------

@bp.get("/jobs")
@bp.arguments(AdminJobListArgs(), location="query")
@bp.response(200, AdminJobPage)
@admin_required()
def list_jobs(args):
    """Jobs of every tenant, newest first."""
    return jobs_page(args)


def jobs_page(args: dict) -> dict:
    """One page of jobs of every tenant, newest first (filters as ``GET /admin/v1/jobs``).

    The page's ids come first from the (created_at, id) index alone, then their rows: a deep
    page of 100,000 jobs costs an index walk, not reading every skipped row.
    """
    query = select(Job.id)
    if args.get("status"):
        query = query.where(Job.status == args["status"])
    if args.get("tenant"):
        query = query.where(Job.tenant_id == select(Tenant.id).where(Tenant.name == args["tenant"]).scalar_subquery())
    if args.get("agent"):
        query = query.where(Job.agent_name == args["agent"])
    if args.get("capability"):
        query = query.where(Job.capability == args["capability"])
    if args.get("region"):
        query = query.where(Job.region == args["region"])
    if args.get("since"):
        query = query.where(Job.created_at >= utcnow() - timedelta(seconds=args["since"]))
    page = paged(query.order_by(Job.created_at.desc(), Job.id.desc()), args)
    rows = {job.id: job for job in db.session.scalars(
        select(Job).options(selectinload(Job.tenant)).where(Job.id.in_(page["items"])))}
    page["items"] = [rows[job_id] for job_id in page["items"] if job_id in rows]
    return with_queue_positions(page)


def find_job(job_id: str) -> Job:
    """The job, or a 404."""
    return jobs.get_job(job_id)


@bp.get("/jobs/<job_id>")
@bp.response(200, AdminJobOut)
@bp.errors(404)
@admin_required()
def get_job(job_id):
    """One job."""
    return find_job(job_id)


@bp.post("/jobs/<job_id>/retry")
@bp.response(200, AdminJobOut)
@bp.errors(404, 409)
@admin_required("admin")
def retry_job(job_id):
    """Requeue a failed or cancelled job as a new attempt."""
    return retry_job_as(job_id, g.admin.name)


def retry_job_as(job_id: str, actor: str) -> Job:
    """``retry job``: a new attempt of a failed or cancelled job, audited."""
    job = jobs.retry(find_job(job_id), actor)
    fleet.audit(actor, "retry job", job_id)
    db.session.commit()
    return job


@bp.post("/jobs/<job_id>/cancel")
@bp.response(200, AdminJobOut)
@bp.errors(404, 409)
@admin_required("admin")
def cancel_job(job_id):
    """Cancel a pending, queued or running job (a running scan is stopped on its agent)."""
    return cancel_job_as(job_id, g.admin.name)


def cancel_job_as(job_id: str, actor: str) -> Job:
    """Cancel a pending, queued or running job, audited."""
    job = jobs.cancel(find_job(job_id), actor)
    fleet.audit(actor, "cancel job", job_id)
    db.session.commit()
    return job


@bp.get("/cluster-info")
@bp.response(200, ClusterInfoOut)
@admin_required()
def cluster_info():
    """Fleet overview: dependencies, agents by region, capacity, queues with their consumers, jobs.

    Answers within about FLEET_READ_TIMEOUT when Redis hangs or is down: what Redis holds
    (leases, queue depths, consumers) is then reported unknown, the rest comes from the database.
    """
    return cluster_overview()


def cluster_overview(snapshot: fleet.FleetSnapshot | None = None) -> dict:
    """``cluster-info``: dependencies, agents by region, capacity, queue depth, jobs."""
    checks = check_dependencies()
    snapshot = snapshot or fleet.fleet_snapshot()
    readable = snapshot.leases_read
    pinged = {current_app.config["REDIS_URL"]: checks["redis"]}  # the default broker's Redis, just pinged
    if not readable and checks["redis"] == "ok":
        checks["redis"] = "error: lease read failed"
    regions: dict[str, dict] = {}
    by_status: dict[str, int] = {}
    # Online agents per (region, capabilities): the queues' consumers.
    kinds: dict[tuple[str, str], int] = {}
    for kind, totals in snapshot.kinds.items():
        by_status[kind.status] = by_status.get(kind.status, 0) + totals.agents
        region = regions.get(kind.region)
        if region is None:
            region = regions[kind.region] = {"online": 0, "draining": 0, "stopping": 0, "offline": 0,
                                             "disabled": 0, "unknown": 0, "jobs_running": 0, "capacity": 0}
        region[kind.status] += totals.agents
        region["jobs_running"] += totals.jobs_running
        region["capacity"] += totals.capacity
        online = totals.agents if kind.status == AgentStatus.ONLINE else 0
        kinds[(kind.region, kind.capabilities)] = kinds.get((kind.region, kind.capabilities), 0) + online
    consumers: dict[str, int | None] = {}
    for (region_name, capabilities), online_agents in kinds.items():
        for queue in queues_for([c for c in capabilities.split(",") if c], region_name):
            consumers[queue] = (consumers.get(queue) or 0) + online_agents if readable else None
    waiting = {queue_for(capability, region): n for capability, region, n in db.session.execute(
        select(Job.capability, Job.region, func.count()).where(Job.status == JobStatus.QUEUED)
        .group_by(Job.capability, Job.region))}
    queues = set(current_app.extensions["celery"].amqp.queues.keys()) | set(consumers) | set(waiting)
    for queue in queues:
        consumers.setdefault(queue, 0 if readable else None)
    depths: dict[str, int | None] = {name: None for name in queues}
    brokers = current_app.extensions["brokers"]
    broker_health = brokers.health({parse_queue(q)[1] for q in queues}, known=pinged)
    if readable:
        depths = brokers.depths(queues)  # None for a queue whose broker is unreachable
    unconsumed = sorted(q for q in queues if consumers[q] == 0 and ((depths[q] or 0) > 0 or waiting.get(q, 0) > 0))
    since = utcnow() - timedelta(hours=24)
    counts: dict[str, int] = dict(jobs.status_counts())
    # One pass over the last day's finished jobs (finished_at index), not every completed job ever.
    finished = dict(db.session.execute(select(Job.status, func.count()).where(
        Job.finished_at >= since, Job.status.in_((JobStatus.FAILED, JobStatus.COMPLETED)))
        .group_by(Job.status)).all())
    counts["failed_24h"] = finished.get(JobStatus.FAILED, 0)
    counts["completed_24h"] = finished.get(JobStatus.COMPLETED, 0)
    info = {
        "api": "ok", "version": __version__, **checks,
        "agents": {"total": snapshot.agents, "by_status": by_status, "by_region": regions},
        "capacity": {"used": sum(r["jobs_running"] for r in regions.values()),
                     "total": sum(r["capacity"] for r in regions.values())},
        "queues": dict(sorted(depths.items())),
        "consumers": dict(sorted(consumers.items())),
        "unconsumed": unconsumed,
        "brokers": broker_health,
        "jobs": {s: counts.get(s, 0) for s in ("pending", "queued", "running", "failed_24h",
                                                "completed_24h")},
    }
    if not readable or checks["redis"] != "ok":
        info["degraded"] = (f"Redis unreadable ({checks['redis']}): agent status, queue depths and consumers"
                            " unknown; agents, capacity, running and queued jobs from the database")
    return info


# --- audit log ------------------------------------------------------------------

@bp.get("/audit")
@bp.arguments(AuditListArgs(), location="query")
@bp.response(200, AuditPage)
@admin_required()
def list_audit(args):
    """The audit log, newest first: who did what to which object, and when."""
    return audit_page(args)


def audit_page(args: dict) -> dict:
    """One page of the audit log, newest first (filters: actor, action, target, since)."""
    query = select(AuditEvent)
    for column in ("actor", "action", "target"):
        if args.get(column):
            query = query.where(getattr(AuditEvent, column) == args[column])
    if args.get("since"):
        query = query.where(AuditEvent.created_at >= utcnow() - timedelta(seconds=args["since"]))
    return paged(query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()), args)


# --- admin tokens ---------------------------------------------------------------

def _admin_token_view(record: AdminToken, **extra) -> Extended:
    return Extended(record, status="revoked" if record.revoked_at else "active", **extra)


@bp.get("/admin-tokens")
@bp.arguments(PageArgs(), location="query")
@bp.response(200, AdminTokenPage)
@admin_required()
def list_admin_tokens(args):
    """List admin tokens: names and roles, never their values."""
    page = paged(select(AdminToken).order_by(AdminToken.id), args)
    page["items"] = [_admin_token_view(t) for t in page["items"]]
    return page


@bp.post("/admin-tokens")
@bp.arguments(AdminTokenCreate())
@bp.response(201, AdminTokenCreated)
@admin_required("admin")
def create_admin_token(data):
    """Create an admin token (role ``admin`` or read-only ``viewer``); shown once."""
    raw = new_token(ADMIN_PREFIX)
    token = AdminToken(name=data["name"], role=data["role"], token_hash=hash_token(raw))
    db.session.add(token)
    fleet.audit(g.admin.name, "create admin token", data["name"], f"role={data['role']}")
    db.session.commit()
    return _admin_token_view(token, token=raw)


@bp.post("/admin-tokens/<int(max=2147483647):token_id>/revoke")
@bp.response(200, AdminTokenOut)
@bp.errors(404)
@admin_required("admin")
def revoke_admin_token(token_id):
    """Revoke an admin token: it is refused from its next request on."""
    token = db.session.get(AdminToken, token_id)
    if token is None:
        raise ApiError(404, f"admin token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        fleet.audit(g.admin.name, "revoke admin token", token.name, f"id={token.id}")
        db.session.commit()
    return _admin_token_view(token)
