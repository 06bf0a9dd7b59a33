"""The job lifecycle: submit, admit, publish, claim, progress, complete, fail, requeue.

``pending`` (accepted) -> ``queued`` (published) -> ``running`` (claimed by one
agent) -> ``completed`` | ``failed`` | ``cancelled``. Delivery is at least once;
the claim makes the effect once: only the current attempt of a queued job can be
claimed. Messages are published only after the database commit, and a failed
publish leaves the job ``pending`` for the next admission, never lost.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
from datetime import timedelta
from urllib.parse import urlparse

from flask import current_app
from sqlalchemy import func, select, update

from .celery_app import declare_queue
from .config import CAPABILITIES, parse_duration
from .errors import ApiError
from .extensions import db
from .models import ACTIVE_STATUSES, Agent, Finding, Job, JobAttempt, Tenant, utcnow
from .security import JOB_PREFIX, hash_token, matches, new_token, security_event
from .metrics import JOB_DURATION, JOBS_FINISHED, QUEUE_WAIT, STALE_CLAIMS
from .routing import RUN_SCAN, queue_for

logger = logging.getLogger(__name__)

__all__ = ["submit", "publish", "admit_pending", "claim", "progress", "complete", "fail",
           "requeue", "retry", "cancel", "queue_position", "queue_positions", "plan_limits", "admission_key",
           "PRIORITY_RANK", "attempts_of", "known_regions", "choose_region", "validate_repo_url", "SEVERITIES"]

SEVERITIES = ("critical", "high", "medium", "low", "info")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:[\w./~-]+$")


def validate_repo_url(url: str) -> str:
    """Accept https and ssh URLs (and file:// when local repos are allowed)."""
    url = url.strip()
    if _SCP_LIKE.match(url):  # git@github.com:org/repo.git
        return url
    parsed = urlparse(url)
    allowed = {"https", "ssh"}
    if current_app.config["ALLOW_LOCAL_REPOS"]:
        allowed.add("file")
    if parsed.scheme not in allowed:
        raise ApiError(400, f"unsupported repository URL scheme {parsed.scheme or '(none)'!r}",
                       {"repo_url": [f"allowed schemes: {', '.join(sorted(allowed))}"]})
    if parsed.scheme != "file" and not parsed.netloc:
        raise ApiError(400, "repository URL has no host", {"repo_url": ["missing host"]})
    if parsed.scheme == "file" and not parsed.path:
        raise ApiError(400, "repository URL has no path", {"repo_url": ["missing path"]})
    return url


def known_regions() -> set[str]:
    """Regions a job may name: configured ones plus those of registered agents."""
    configured = {r.strip() for r in current_app.config["REGIONS"].split(",") if r.strip()}
    registered = set(db.session.scalars(select(Agent.region).where(Agent.disabled.is_(False)).distinct()))
    return configured | registered


def choose_region(capability: str) -> str:
    """Region for a job that names none: the live, active region with most free slots.

    Ties go to the alphabetically first region. With no live agent for the
    capability anywhere, the job is refused (409) rather than parked on a queue
    nobody consumes.
    """
    leases = current_app.extensions["leases"]
    agents = db.session.scalars(select(Agent).where(Agent.disabled.is_(False))).all()
    candidates = [a for a in agents if capability in a.capability_list]
    live = leases.get_many([a.name for a in candidates])
    free: dict[str, int] = {}
    for agent in candidates:
        lease = live.get(agent.name)
        if lease is None or agent.desired_state != "active":
            continue
        slots = agent.max_jobs - int(lease.get("jobs_running", 0))
        free[agent.region] = free.get(agent.region, 0) + max(slots, 0)
    if not free:
        raise ApiError(409, f"no live agent with capability {capability!r} in any region;"
                            " name a region to queue the job anyway",
                       {"region": ["no region has a live agent for this capability"]})
    return sorted(free.items(), key=lambda item: (-item[1], item[0]))[0][0]


def submit(tenant: Tenant, data: dict, idempotency_key: str | None) -> tuple[Job, bool]:
    """Create a job for ``tenant`` (or return the one with the same Idempotency-Key)."""
    if idempotency_key:
        existing = db.session.scalar(select(Job).where(
            Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            return existing, False
    capability = data["capability"]
    if capability not in CAPABILITIES:
        raise ApiError(400, f"unknown capability {capability!r}",
                       {"capability": [f"valid: {', '.join(CAPABILITIES)}"]})
    region = data.get("region")
    if region:
        regions = known_regions()
        if region not in regions:
            raise ApiError(400, f"unknown region {region!r}",
                           {"region": [f"valid: {', '.join(sorted(regions)) or '(none registered)'}"]})
    else:
        region = choose_region(capability)
    config = current_app.config
    repo_url = validate_repo_url(data["repo_url"])
    limits = plan_limits(tenant)
    counts = _tenant_counts(tenant.id)
    waiting = counts.get("pending", 0) + counts.get("queued", 0)
    if waiting >= limits["max_queue"]:
        raise ApiError(429, f"queue full: tenant {tenant.name!r} on plan {tenant.plan!r} has {waiting}"
                            f" jobs waiting (max {limits['max_queue']}); retry when some have started",
                       {"plan": tenant.plan, "waiting": waiting, "max_queue": limits["max_queue"]},
                       headers={"Retry-After": "30"})
    # Admit at once when the tenant has a free slot and nothing waits before this job
    # (a soft limit: concurrent submits may overshoot by a few); else it waits as pending.
    active = counts.get("queued", 0) + counts.get("running", 0)
    admit = active < limits["max_concurrent"] and counts.get("pending", 0) == 0
    priority = data.get("priority") or "normal"
    now = utcnow()
    job = Job(tenant_id=tenant.id, capability=capability, region=region,
              repo_url=repo_url, ref=data.get("ref") or "HEAD", priority=priority,
              admission_key=admission_key(now, priority), created_at=now,
              status="queued" if admit else "pending", queued_at=now if admit else None,
              max_attempts=int(config["JOB_MAX_ATTEMPTS"]),
              time_limit=int(parse_duration(config["JOB_TIME_LIMIT"], "JOB_TIME_LIMIT")),
              idempotency_key=idempotency_key)
    db.session.add(job)
    try:
        db.session.commit()
    except Exception:
        db.session.rollback()
        if idempotency_key:  # a concurrent retry with the same key won the insert
            existing = db.session.scalar(select(Job).where(
                Job.tenant_id == tenant.id, Job.idempotency_key == idempotency_key))
            if existing is not None:
                return existing, False
        raise
    logger.info("job accepted job_id=%s tenant=%s capability=%s region=%s status=%s",
                job.id, tenant.name, capability, region, job.status)
    if admit:
        publish(job)
    elif active < limits["max_concurrent"]:
        admit_pending(tenant.id)
        db.session.refresh(job)
    return job, True


#: Priority levels, highest first, and their rank in the admission formula.
PRIORITY_RANK = {"critical": 3, "high": 2, "normal": 1, "low": 0}


def admission_key(created_at, priority: str):
    """Pending jobs are admitted in ascending order of ``created_at - rank x PRIORITY_AGING``.

    Equivalently, a job's effective priority is ``rank + waited / PRIORITY_AGING``:
    every PRIORITY_AGING of waiting is worth one level, so a low job (rank 0) that
    has waited 3 x PRIORITY_AGING goes before any critical job (rank 3) submitted
    after that moment. Storing the key keeps admission one indexed ORDER BY.
    """
    aging = parse_duration(current_app.config["PRIORITY_AGING"], "PRIORITY_AGING")
    return created_at - timedelta(seconds=PRIORITY_RANK[priority] * aging)


def plan_limits(tenant: Tenant) -> dict:
    """The tenant's plan limits (``max_concurrent``, ``max_queue``)."""
    plans = current_app.config["PLANS"]
    plan = plans.get(tenant.plan)
    if plan is None:  # a plan removed from the config: fall back, loudly
        logger.warning("tenant %s has unknown plan %r; using %r", tenant.name, tenant.plan,
                       current_app.config["DEFAULT_PLAN"])
        plan = plans[current_app.config["DEFAULT_PLAN"]]
    return {"max_concurrent": int(plan["max_concurrent"]), "max_queue": int(plan["max_queue"])}


def _tenant_counts(tenant_id: int) -> dict[str, int]:
    return dict(db.session.execute(select(Job.status, func.count()).where(
        Job.tenant_id == tenant_id, Job.status.in_(("pending", "queued", "running")))
        .group_by(Job.status)).all())


def _active_count(tenant_id: int) -> int:
    return db.session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES)))


def queue_position(job: Job) -> int | None:
    """1-based position of a waiting job: queued jobs go first-in first-out on their queue;
    a pending job comes after everything queued there and the tenant's pending jobs that
    are admitted before it. None once the job runs or ended."""
    if job.status == "queued":
        ahead = db.session.scalar(select(func.count()).select_from(Job).where(
            Job.status == "queued", Job.capability == job.capability, Job.region == job.region,
            Job.queued_at < job.queued_at))
        return ahead + 1
    if job.status == "pending":
        queued = db.session.scalar(select(func.count()).select_from(Job).where(
            Job.status == "queued", Job.capability == job.capability, Job.region == job.region))
        before = db.session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == job.tenant_id, Job.status == "pending",
            Job.admission_key < job.admission_key))
        return queued + before + 1
    return None


def queue_positions(waiting: list[Job]) -> dict[str, int]:
    """:func:`queue_position` of many jobs at once: the same rule in two queries, whatever their number."""
    queues = {(j.capability, j.region) for j in waiting}
    if not queues:
        return {}
    queued_at: dict[tuple[str, str], list] = {q: [] for q in queues}
    for capability, region, at in db.session.execute(select(Job.capability, Job.region, Job.queued_at).where(
            Job.status == "queued", Job.capability.in_({q[0] for q in queues}),
            Job.region.in_({q[1] for q in queues}))):
        if (capability, region) in queued_at and at is not None:
            queued_at[(capability, region)].append(at)
    for times in queued_at.values():
        times.sort()
    tenants = {j.tenant_id for j in waiting if j.status == "pending"}
    pending: dict[int, list] = {t: [] for t in tenants}
    if tenants:
        for tenant_id, key in db.session.execute(select(Job.tenant_id, Job.admission_key).where(
                Job.status == "pending", Job.tenant_id.in_(tenants))):
            pending[tenant_id].append(key)
        for keys in pending.values():
            keys.sort()
    positions = {}
    for job in waiting:
        times = queued_at[(job.capability, job.region)]
        if job.status == "queued" and job.queued_at is not None:
            positions[job.id] = bisect.bisect_left(times, job.queued_at) + 1
        elif job.status == "pending":
            positions[job.id] = len(times) + bisect.bisect_left(pending[job.tenant_id], job.admission_key) + 1
    return positions


def admit_pending(tenant_id: int) -> int:
    """Queue and publish the tenant's oldest pending jobs while it has free slots."""
    has_pending = db.session.scalar(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.status == "pending").limit(1))
    if has_pending is None:
        return 0
    tenant = db.session.get(Tenant, tenant_id)
    free = plan_limits(tenant)["max_concurrent"] - _active_count(tenant_id)
    if free <= 0:
        return 0
    ids = db.session.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.status == "pending")
                             .order_by(Job.admission_key, Job.id).limit(free)).all()
    # One statement for the batch; the status guard and RETURNING keep a concurrent
    # admission (the API on a completion, the controller) from publishing a job twice.
    won = set(db.session.scalars(update(Job).where(Job.id.in_(ids), Job.status == "pending")
                                 .values(status="queued", queued_at=utcnow()).returning(Job.id)).all())
    db.session.commit()
    admitted = 0
    for job in db.session.scalars(select(Job).where(Job.id.in_(won)).order_by(Job.admission_key, Job.id)
                                  .execution_options(populate_existing=True)):
        admitted += publish(job)
    return admitted


def publish(job: Job) -> bool:
    """Publish a queued job's current attempt; on failure put it back to ``pending``."""
    celery = current_app.extensions["celery"]
    queue = queue_for(job.capability, job.region)
    try:
        declare_queue(celery, queue)
        celery.send_task(RUN_SCAN, kwargs={"job_id": job.id, "attempt": job.attempt,
                                           "capability": job.capability, "region": job.region},
                         retry=True, retry_policy={"max_retries": 2, "interval_start": 0,
                                                   "interval_step": 0.5, "interval_max": 1})
    except Exception as exc:  # broker down: keep the job, admit it again later
        logger.error("failed to publish job job_id=%s queue=%s: %s", job.id, queue, exc)
        db.session.execute(update(Job).where(Job.id == job.id, Job.status == "queued",
                                             Job.attempt == job.attempt)
                           .values(status="pending", error=f"publish failed: {exc}"))
        db.session.commit()
        job.status, job.error = "pending", f"publish failed: {exc}"
        return False
    logger.info("job queued job_id=%s attempt=%s queue=%s", job.id, job.attempt, queue)
    return True


def _end_attempt(job: Job, outcome: str, reason: str | None = None) -> None:
    """Close the job's current attempt record (in the caller's transaction), if it is open."""
    db.session.execute(update(JobAttempt).where(
        JobAttempt.job_id == job.id, JobAttempt.attempt == job.attempt, JobAttempt.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome=outcome, reason=reason))


def attempts_of(job: Job) -> list[JobAttempt]:
    """The job's attempts, first to last: who ran each, when, and how it ended."""
    return list(db.session.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id)
                                   .order_by(JobAttempt.attempt)))


def _get_job(job_id: str) -> Job:
    job = db.session.get(Job, job_id)
    if job is None:
        raise ApiError(404, f"job {job_id!r} not found")
    return job


def claim(agent: Agent, job_id: str, attempt: int) -> tuple[Job, str]:
    """Give the current attempt of a queued job to ``agent``; refuse anything else.

    Returns the job and its scoped job token: valid only for this job and attempt,
    for the job's time limit plus JOB_TOKEN_GRACE; progress, complete and fail need it.
    """
    job = _get_job(job_id)
    if job.capability not in agent.capability_list or job.region != agent.region:
        raise ApiError(403, f"agent {agent.name!r} cannot run {job.capability} jobs in {job.region}")
    if agent.desired_state != "active":
        raise ApiError(409, f"agent {agent.name!r} is draining", {"reason": "draining"})
    token = new_token(JOB_PREFIX)
    now = utcnow()
    grace = parse_duration(current_app.config["JOB_TOKEN_GRACE"], "JOB_TOKEN_GRACE")
    result = db.session.execute(
        update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "queued")
        .values(status="running", agent_id=agent.id, agent_name=agent.name, started_at=now, progress=0,
                progress_message=None, job_token_hash=hash_token(token),
                job_token_expires_at=now + timedelta(seconds=job.time_limit + grace)))
    if result.rowcount == 1:  # every attempt number is claimed at most once: its record starts here
        db.session.add(JobAttempt(job_id=job_id, attempt=attempt, agent_name=agent.name, started_at=now))
    db.session.commit()
    db.session.refresh(job)
    if result.rowcount != 1:
        if job.status == "running" and job.agent_id == agent.id and job.attempt == attempt:
            # The agent retried a claim whose answer it lost: a fresh token replaces the old one.
            job.job_token_hash = hash_token(token)
            db.session.commit()
            return job, token
        STALE_CLAIMS.labels(job.capability, job.region).inc()
        raise ApiError(409, f"job {job_id} attempt {attempt} is not claimable",
                       {"reason": "stale", "status": job.status, "attempt": job.attempt})
    logger.info("job claimed job_id=%s attempt=%s agent=%s tenant_id=%s", job.id, attempt, agent.name,
                job.tenant_id)
    if job.queued_at and job.started_at:
        QUEUE_WAIT.labels(job.capability, job.region).observe(
            max(0.0, (job.started_at - job.queued_at).total_seconds()))
    return job, token


def _finished(job: Job, outcome: str) -> None:
    """Observe an attempt's duration and, for final states, the outcome."""
    if job.started_at:
        JOB_DURATION.labels(job.capability, job.region, outcome).observe(
            max(0.0, (utcnow() - job.started_at).total_seconds()))
    if job.status in ("completed", "failed", "cancelled"):
        JOBS_FINISHED.labels(job.capability, job.region, job.status).inc()


def _held(agent: Agent, job_id: str, attempt: int, job_token: str | None) -> Job:
    """The job, if ``agent`` holds this attempt and presents its valid job token."""
    job = _get_job(job_id)
    if job.agent_id != agent.id or job.attempt != attempt:
        security_event("access_denied", "agent", f"agent={agent.name} job_id={job_id} attempt={attempt}")
        raise ApiError(403, f"agent {agent.name!r} does not hold job {job_id} attempt {attempt}")
    if not job_token or not job.job_token_hash or not matches(job_token, job.job_token_hash) \
            or (job.job_token_expires_at and job.job_token_expires_at < utcnow()):
        security_event("invalid_token", "job", f"agent={agent.name} job_id={job_id} attempt={attempt}")
        raise ApiError(403, f"invalid or expired job token for job {job_id} attempt {attempt}")
    return job


def progress(agent: Agent, job_id: str, attempt: int, percent: int, message: str | None,
             job_token: str | None) -> Job:
    """Record progress of a running job held by ``agent`` (409 once it is cancelled)."""
    job = _held(agent, job_id, attempt, job_token)
    if job.status != "running":
        raise ApiError(409, f"job {job_id} is {job.status}", {"status": job.status})
    job.progress = percent
    job.progress_message = message
    db.session.commit()
    return job


def _fingerprint(item: dict) -> str:
    """Stable identity of a finding: survives rescans and shifted lines."""
    basis = item.get("fingerprint") or "|".join(
        [item["engine"], item["rule_id"], item["path"], item.get("secret_hash") or item["message"]])
    return hashlib.sha256(basis.encode()).hexdigest()[:32]


def complete(agent: Agent, job_id: str, attempt: int, findings: list[dict], summary: dict,
             job_token: str | None) -> Job:
    """Store the findings and mark the job completed (repeating it is harmless)."""
    job = _held(agent, job_id, attempt, job_token)
    if job.status == "completed":
        return job  # the agent retried a completion whose answer it lost
    if job.status != "running":
        raise ApiError(409, f"job {job_id} is {job.status}", {"status": job.status})
    counts = {s: 0 for s in SEVERITIES}
    for item in findings:
        counts[item["severity"]] += 1
        db.session.add(Finding(job_id=job.id, fingerprint=_fingerprint(item), **{
            k: item.get(k) for k in ("rule_id", "severity", "confidence", "path", "start_line",
                                     "end_line", "message", "engine", "cwe", "secret_hash",
                                     "preview", "commit")}))
    job.summary_json = json.dumps(dict(summary or {}, findings=len(findings), by_severity=counts))
    job.status, job.progress, job.finished_at, job.error = "completed", 100, utcnow(), None
    _end_attempt(job, "completed")
    db.session.commit()
    _finished(job, "completed")
    logger.info("job completed job_id=%s attempt=%s agent=%s tenant_id=%s findings=%d",
                job.id, attempt, agent.name, job.tenant_id, len(findings))
    admit_pending(job.tenant_id)
    return job


def requeue(job: Job, reason: str) -> Job:
    """Send a job back to the queue as attempt + 1, or fail it after max attempts."""
    if job.attempt >= job.max_attempts:
        job.status, job.finished_at = "failed", utcnow()
        job.error = f"{reason} (attempt {job.attempt} of {job.max_attempts})"
        _end_attempt(job, "failed", reason)
        db.session.commit()
        JOBS_FINISHED.labels(job.capability, job.region, "failed").inc()
        logger.error("job failed permanently job_id=%s attempts=%s reason=%s",
                     job.id, job.attempt, reason)
        admit_pending(job.tenant_id)
        return job
    _end_attempt(job, "requeued", reason)
    job.attempt += 1
    job.status, job.agent_id, job.error = "queued", None, reason
    job.queued_at, job.started_at, job.progress = utcnow(), None, 0
    job.job_token_hash = job.job_token_expires_at = None
    db.session.commit()
    logger.warning("job requeued job_id=%s attempt=%s reason=%s", job.id, job.attempt, reason)
    publish(job)
    return job


def fail(agent: Agent, job_id: str, attempt: int, error: str, retry: bool,
         job_token: str | None) -> Job:
    """Record a failed attempt; retry it if asked and attempts remain."""
    job = _held(agent, job_id, attempt, job_token)
    if job.status == "failed":
        return job
    if job.status != "running":
        raise ApiError(409, f"job {job_id} is {job.status}", {"status": job.status})
    if retry:
        _finished(job, "retried")
        return requeue(job, error)
    job.status, job.finished_at, job.error = "failed", utcnow(), error
    _end_attempt(job, "failed", error)
    db.session.commit()
    _finished(job, "failed")
    logger.error("job failed permanently job_id=%s attempt=%s agent=%s error=%s",
                 job.id, attempt, agent.name, error)
    admit_pending(job.tenant_id)
    return job


def retry(job: Job, actor: str) -> Job:
    """Give a failed or cancelled job a new attempt (``exploop-admin retry job``)."""
    if job.status not in ("failed", "cancelled"):
        raise ApiError(409, f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried",
                       {"status": job.status})
    job.attempt += 1
    job.max_attempts = max(job.max_attempts, job.attempt)
    job.status, job.agent_id, job.finished_at, job.started_at = "pending", None, None, None
    job.progress, job.error, job.cancelled_by = 0, None, None
    job.job_token_hash = job.job_token_expires_at = None
    job.admission_key = admission_key(utcnow(), job.priority)
    db.session.commit()
    logger.info("job retried job_id=%s attempt=%s by=%s", job.id, job.attempt, actor)
    admit_pending(job.tenant_id)
    db.session.refresh(job)
    return job


def cancel(job: Job, actor: str) -> Job:
    """Cancel a pending, queued or running job. A running scan stops on its agent at the
    agent's next check (its progress report is answered 409 cancelled), which frees the slot."""
    if job.status not in ("pending", "queued", "running"):
        raise ApiError(409, f"job {job.id} is {job.status}; only pending, queued or running jobs"
                            " can be cancelled", {"status": job.status})
    was = job.status
    result = db.session.execute(update(Job).where(Job.id == job.id, Job.status == was).values(
        status="cancelled", finished_at=utcnow(), cancelled_by=actor, error=f"cancelled by {actor}"))
    if result.rowcount == 1 and was == "running":
        _end_attempt(job, "cancelled", f"cancelled by {actor}")
    db.session.commit()
    db.session.refresh(job)
    if result.rowcount != 1:  # it changed under us (claimed, finished): say what it is now
        return cancel(job, actor) if job.status in ("pending", "queued", "running") else job
    JOBS_FINISHED.labels(job.capability, job.region, "cancelled").inc()
    logger.info("job cancelled job_id=%s was=%s by=%s tenant_id=%s agent=%s",
                job.id, was, actor, job.tenant_id, job.agent_name)
    admit_pending(job.tenant_id)
    return job
