"""The job lifecycle: submit, admit, publish, claim, progress, complete, fail, requeue.

``pending`` (accepted) -> ``queued`` (published) -> ``running`` (claimed by one
agent) -> ``completed`` | ``failed`` | ``cancelled``. Delivery is at least once;
the claim makes the effect once: only the current attempt of a queued job can be
claimed. Messages are published only after the database commit, and a failed
publish leaves the job ``pending`` for the next admission, never lost.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from bisect import bisect_left
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import cast
from urllib.parse import urlparse

import redis
from flask import current_app
from sqlalchemy import and_, case, func, literal, or_, select, update
from sqlalchemy.engine import CursorResult

from ..celery_app import declare_queue
from ..config import parse_duration
from ..destinations import DestinationRefused, repo_host, resolve_for_submit
from ..metrics import JOB_DURATION, JOBS_FINISHED, QUEUE_WAIT, STALE_CLAIMS, UNSERVED_SUBMITS
from ..routing import RUN_SCAN, queue_for
from ..vocabulary import ADMITTED_STATUSES, FINAL_STATUSES, SEVERITIES, UNFINISHED_STATUSES, DesiredState, JobStatus
from . import vault
from .exceptions import ApiError
from .extensions import db
from .models import Agent, Finding, Job, JobAttempt, Tenant, utcnow
from .security import JOB_PREFIX, hash_token, matches, new_token, security_event

logger = logging.getLogger(__name__)

__all__ = ["submit", "publish", "admit_pending", "claim", "progress", "complete", "fail",
           "requeue", "requeue_running", "retry", "cancel", "queue_position", "plan_limits", "admission_key",
           "PRIORITY_RANK", "known_regions", "choose_region", "validate_repo_url",
           "adopt_incarnation", "requeue_lost", "status_counts", "status_counts_by_tenant", "get_job",
           "queue_positions", "attempts_of"]

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:[\w./~-]+$")


#: Control characters (C0, DEL, C1, Unicode line breaks) and whitespace: a URL never needs
#: them (spaces are %20), and a newline in a logged value forges log lines.
_CONTROL = re.compile(r"[\x00-\x20\x7f-\x9f\u2028\u2029]")


def validate_repo_url(url: str) -> str:
    """Accept https and ssh URLs (and file:// when local repos are allowed) whose host the
    destination policy allows."""
    url = url.strip(" ")
    if _CONTROL.search(url):
        raise ApiError(400, "repository URL contains whitespace or control characters",
                       {"repo_url": ["control characters and whitespace are not allowed (encode spaces as %20)"]})
    if not _SCP_LIKE.match(url):  # git@github.com:org/repo.git needs no scheme check
        _check_scheme(url)
    try:
        host = repo_host(url)
        if host is not None:
            current_app.extensions["destinations"].check(*host, unresolved_ok=True, resolve=resolve_for_submit)
    except DestinationRefused as exc:
        raise ApiError(400, str(exc), {"repo_url": ["refused by the repository destination policy"]}) from None
    return url


def _check_scheme(url: str) -> None:
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


def known_regions(include_disabled: bool = False) -> set[str]:
    """Regions a job may name: configured ones plus those of registered (enabled) agents."""
    configured = {r.strip() for r in current_app.config["REGIONS"].split(",") if r.strip()}
    query = select(Agent.region).distinct()
    if not include_disabled:
        query = query.where(Agent.disabled.is_(False))
    return configured | set(db.session.scalars(query))


def unserved_warning(capability: str, region: str) -> str | None:
    """Why no agent takes jobs from ``<capability>.<region>`` now, or None when one does.

    A submit naming its region is accepted (an agent may come), but the tenant is told,
    and the count is a metric, rather than silence while the job waits.
    """
    queue = queue_for(capability, region)
    # Columns only, and leases read in batches until a live one turns up: a submit to a
    # region of a thousand agents costs one small query and usually one MGET.
    rows = db.session.execute(select(Agent.name, Agent.capabilities, Agent.desired_state).where(
        Agent.region == region, Agent.disabled.is_(False))).all()
    serving = [row for row in rows if capability in row.capabilities.split(",")]
    if not serving:
        reason = "no_agent"
        message = (f"no registered agent serves {queue}: the job waits until an agent with capability"
                   f" {capability!r} runs in region {region!r}")
    else:
        active = [row.name for row in serving if row.desired_state == DesiredState.ACTIVE]
        leases = current_app.extensions["lease_reads"]
        try:
            for start in range(0, len(active), 100):
                if leases.present(active[start:start + 100]):
                    return None
        except redis.RedisError:
            return None  # cannot tell: no warning rather than a wrong one
        reason = "no_live_agent"
        message = (f"no live agent consumes {queue} now ({len(serving)} registered, none online):"
                   " the job waits until one is")
    UNSERVED_SUBMITS.labels(capability, region, reason).inc()
    logger.warning("job submitted to a queue nobody consumes queue=%s reason=%s", queue, reason)
    return message


def choose_region(capability: str) -> str:
    """Region for a job that names none: the live, active region with most free slots.

    Ties go to the alphabetically first region. With no live agent for the
    capability anywhere, the job is refused (409) rather than parked on a queue
    nobody consumes.
    """
    leases = current_app.extensions["leases"]
    agents = db.session.scalars(select(Agent).where(Agent.disabled.is_(False))).all()
    candidates = [a for a in agents if capability in a.capability_list]
    live = leases.present([a.name for a in candidates])
    # Running jobs from the job records: a lease body lags a heartbeat.
    running = dict(db.session.execute(select(Job.agent_id, func.count()).where(
        Job.status == JobStatus.RUNNING).group_by(Job.agent_id)).all())
    free: dict[str, int] = {}
    for agent in candidates:
        if agent.name not in live or agent.desired_state != DesiredState.ACTIVE:
            continue
        slots = agent.max_jobs - running.get(agent.id, 0)
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
    capability = data["capability"]  # validated by the request schema (api/schemas.py)
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
    shown_url, sealed_credentials = vault.seal_repo_url(repo_url)
    limits = plan_limits(tenant)
    counts = status_counts(tenant.id)
    waiting = counts.get(JobStatus.PENDING, 0) + counts.get(JobStatus.QUEUED, 0)
    if waiting >= limits["max_queue"]:
        raise ApiError(429, f"queue full: tenant {tenant.name!r} on plan {tenant.plan!r} has {waiting}"
                            f" jobs waiting (max {limits['max_queue']}); retry when some have started",
                       {"plan": tenant.plan, "waiting": waiting, "max_queue": limits["max_queue"]},
                       headers={"Retry-After": "30"})
    # Admit at once when the tenant has a free slot and nothing waits before this job
    # (a soft limit: concurrent submits may overshoot by a few); else it waits as pending.
    active = counts.get(JobStatus.QUEUED, 0) + counts.get(JobStatus.RUNNING, 0)
    admit = active < limits["max_concurrent"] and counts.get(JobStatus.PENDING, 0) == 0
    priority = data.get("priority") or "normal"
    now = utcnow()
    job = Job(tenant_id=tenant.id, capability=capability, region=region,
              repo_url=shown_url, repo_credentials=sealed_credentials, ref=data.get("ref") or "HEAD",
              priority=priority,
              admission_key=admission_key(now, priority), created_at=now,
              status=JobStatus.QUEUED if admit else JobStatus.PENDING, queued_at=now if admit else None,
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


def status_counts(tenant_id: int | None = None, statuses=UNFINISHED_STATUSES) -> dict[str, int]:
    """Jobs per status (every status in ``statuses``, zeros included), of one tenant or all."""
    query = select(Job.status, func.count()).where(Job.status.in_(statuses)).group_by(Job.status)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    counts: dict[str, int] = dict.fromkeys(statuses, 0)
    counts.update((str(status), int(n)) for status, n in db.session.execute(query).all())
    return counts


def status_counts_by_tenant(tenant_ids: list[int], statuses=UNFINISHED_STATUSES) -> dict[int, dict[str, int]]:
    """``status_counts`` of several tenants in one grouped query."""
    counts: dict[int, dict[str, int]] = {tenant_id: dict.fromkeys(statuses, 0) for tenant_id in tenant_ids}
    for tenant_id, status, n in db.session.execute(
            select(Job.tenant_id, Job.status, func.count()).where(Job.tenant_id.in_(tenant_ids), Job.status.in_(statuses))
            .group_by(Job.tenant_id, Job.status)):
        counts[tenant_id][str(status)] = int(n)
    return counts


def get_job(job_id: str, tenant_id: int | None = None) -> Job:
    """The job, or 404 (also for another tenant's job: its existence is not disclosed)."""
    job = db.session.get(Job, job_id)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        raise ApiError(404, f"job {job_id!r} not found")
    return job


def _execute(statement) -> CursorResult:
    """Run an UPDATE; its result tells how many rows it changed (``rowcount``)."""
    return cast(CursorResult, db.session.execute(statement))


def _count(*where) -> int:
    """Jobs matching ``where`` (one COUNT)."""
    return db.session.scalar(select(func.count()).select_from(Job).where(*where)) or 0


def _active_count(tenant_id: int) -> int:
    return _count(Job.tenant_id == tenant_id, Job.status.in_(ADMITTED_STATUSES))


def queue_position(job: Job) -> int | None:
    """1-based position of a waiting job (see ``queue_positions``); None once it runs or ended."""
    return queue_positions([job])[job.id]


def _ranks(anchors: dict, rows: Sequence) -> dict:
    """Per group: (jobs strictly before the group's first key, sorted keys from there on)."""
    ranges: dict = {group: [] for group in anchors}
    for *group, key in rows:
        ranges[tuple(group)].append(key)
    return {group: (anchors[group], sorted(keys)) for group, keys in ranges.items()}


def _before(keys: dict, column_of, key_column, where) -> dict:
    """For each group (values of ``column_of``) and each key in ``keys[group]``: how many rows
    matching ``where`` in that group have a key strictly below it.

    Two statements for any number of groups and keys: a grouped count below each group's
    smallest key, and the keys between its smallest and largest (index range scans).
    """
    if not keys:
        return {}
    low = {group: min(values) for group, values in keys.items()}
    high = {group: max(values) for group, values in keys.items()}

    def in_group(group):
        return and_(*[column == value for column, value in zip(column_of, group, strict=True)])
    counted = dict(((*group,), n) for *group, n in db.session.execute(
        select(*column_of, func.count()).where(where, or_(*[
            and_(in_group(g), key_column < low[g]) for g in keys])).group_by(*column_of)).all())
    anchors = {g: counted.get(g, 0) for g in keys}
    rows = db.session.execute(select(*column_of, key_column).where(where, or_(*[
        and_(in_group(g), key_column >= low[g], key_column <= high[g]) for g in keys]))).all()
    ranks = _ranks(anchors, rows)
    return {g: {key: ranks[g][0] + bisect_left(ranks[g][1], key) for key in values}
            for g, values in keys.items()}


def queue_positions(page: list[Job]) -> dict[str, int | None]:
    """1-based positions of a page of jobs, in a handful of indexed statements (not per job).

    Queued jobs go first-in first-out on their queue; a pending job comes after
    everything queued there and the tenant's pending jobs that are admitted before it.
    One grouped statement reads, for each queue the page touches, how many jobs it holds
    and how many wait ahead of the page's first job there; a range read orders the rest.
    """
    positions: dict[str, int | None] = {job.id: None for job in page}
    queued = [j for j in page if j.status == JobStatus.QUEUED and j.queued_at is not None]
    pending = [j for j in page if j.status == JobStatus.PENDING]
    if not queued and not pending:
        return positions
    times: dict[tuple[str, str], list[datetime]] = {}  # queue -> the page's queued_at there
    for job in queued:
        times.setdefault((job.capability, job.region), []).append(cast(datetime, job.queued_at))
    first = {queue: min(at) for queue, at in times.items()}
    in_queue = lambda c, r: and_(Job.capability == c, Job.region == r)  # noqa: E731
    ahead = func.sum(case(*[(and_(in_queue(*q), Job.queued_at < at), 1) for q, at in first.items()], else_=0)) \
        if first else literal(0)
    queues = {(j.capability, j.region) for j in queued + pending}
    totals, anchors = {}, {}
    for capability, region, total, before in db.session.execute(
            select(Job.capability, Job.region, func.count(), ahead)
            .where(Job.status == JobStatus.QUEUED, or_(*[in_queue(*q) for q in queues]))
            .group_by(Job.capability, Job.region)).all():
        totals[(capability, region)], anchors[(capability, region)] = int(total), int(before or 0)
    if queued:
        last = {queue: max(at) for queue, at in times.items()}
        rows = db.session.execute(select(Job.capability, Job.region, Job.queued_at).where(
            Job.status == JobStatus.QUEUED, or_(*[
                and_(in_queue(*q), Job.queued_at >= first[q], Job.queued_at <= last[q]) for q in first]))).all()
        ranks = _ranks({q: anchors.get(q, 0) for q in first}, rows)
        for job in queued:
            anchor, keys = ranks[(job.capability, job.region)]
            positions[job.id] = anchor + bisect_left(keys, job.queued_at) + 1
    if pending:
        admission: dict = {}
        for job in pending:
            admission.setdefault((job.tenant_id,), set()).add(job.admission_key)
        before = _before(admission, (Job.tenant_id,), Job.admission_key, Job.status == JobStatus.PENDING)
        for job in pending:
            positions[job.id] = (totals.get((job.capability, job.region), 0)
                                 + before[(job.tenant_id,)][job.admission_key] + 1)
    return positions


def admit_pending(tenant_id: int) -> int:
    """Queue and publish the tenant's oldest pending jobs while it has free slots."""
    has_pending = db.session.scalar(select(Job.id).where(
        Job.tenant_id == tenant_id, Job.status == JobStatus.PENDING).limit(1))
    if has_pending is None:
        return 0
    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None:
        return 0
    free = plan_limits(tenant)["max_concurrent"] - _active_count(tenant_id)
    if free <= 0:
        return 0
    ids = db.session.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.status == JobStatus.PENDING)
                             .order_by(Job.admission_key, Job.id).limit(free)).all()
    # One statement for the batch; the status guard and RETURNING keep a concurrent
    # admission (the API on a completion, the controller) from publishing a job twice.
    won = set(db.session.scalars(update(Job).where(Job.id.in_(ids), Job.status == JobStatus.PENDING)
                                 .values(status=JobStatus.QUEUED, queued_at=utcnow()).returning(Job.id)).all())
    db.session.commit()
    admitted = 0
    for job in db.session.scalars(select(Job).where(Job.id.in_(won)).order_by(Job.admission_key, Job.id)
                                  .execution_options(populate_existing=True)):
        admitted += publish(job)
    return admitted


def publish(job: Job) -> bool:
    """Publish a queued job's current attempt; on failure put it back to ``pending``."""
    celery = current_app.extensions["brokers"].for_region(job.region).celery
    queue = queue_for(job.capability, job.region)
    try:
        declare_queue(celery, queue)
        celery.send_task(RUN_SCAN, kwargs={"job_id": job.id, "attempt": job.attempt,
                                           "capability": job.capability, "region": job.region},
                         retry=True, retry_policy={"max_retries": 2, "interval_start": 0,
                                                   "interval_step": 0.5, "interval_max": 1})
    except Exception as exc:  # broker down: keep the job, admit it again later
        logger.error("failed to publish job job_id=%s queue=%s: %s", job.id, queue, exc)
        db.session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED,
                                             Job.attempt == job.attempt)
                           .values(status=JobStatus.PENDING, error=f"publish failed: {exc}"))
        db.session.commit()
        job.status, job.error = JobStatus.PENDING, f"publish failed: {exc}"
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


def claim(agent: Agent, job_id: str, attempt: int, incarnation: str | None = None) -> tuple[Job, str]:
    """Give the current attempt of a queued job to ``agent``; refuse anything else.

    Returns the job and its scoped job token: valid only for this job and attempt,
    for the job's time limit plus JOB_TOKEN_GRACE; progress, complete and fail need it.
    A claim from a new ``incarnation`` of the agent first requeues what the previous one held.
    """
    if incarnation:
        adopt_incarnation(agent, incarnation)
    job = get_job(job_id)
    if job.capability not in agent.capability_list or job.region != agent.region:
        raise ApiError(403, f"agent {agent.name!r} cannot run {job.capability} jobs in {job.region}")
    if agent.desired_state != DesiredState.ACTIVE:
        raise ApiError(409, f"agent {agent.name!r} is draining", {"reason": DesiredState.DRAINING})
    token = new_token(JOB_PREFIX)
    now = utcnow()
    grace = parse_duration(current_app.config["JOB_TOKEN_GRACE"], "JOB_TOKEN_GRACE")
    result = _execute(
        update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, agent_id=agent.id, agent_name=agent.name, incarnation=incarnation,
                started_at=now, progress=0, run_deadline=now + timedelta(seconds=job.time_limit),
                progress_message=None, job_token_hash=hash_token(token),
                job_token_expires_at=now + timedelta(seconds=job.time_limit + grace)))
    if result.rowcount == 1:  # every attempt number is claimed at most once: its record starts here
        db.session.add(JobAttempt(job_id=job_id, attempt=attempt, agent_name=agent.name, started_at=now))
    db.session.commit()
    db.session.refresh(job)
    if result.rowcount != 1:
        if job.status == JobStatus.RUNNING and job.agent_id == agent.id and job.attempt == attempt:
            # The agent retried a claim whose answer it lost: a fresh token replaces the old one.
            job.job_token_hash = hash_token(token)
            job.incarnation = incarnation
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


def fail_unreadable_credentials(job: Job) -> None:
    """A job whose sealed credentials no configured key opens can never run: fail it, loudly."""
    logger.error("cannot decrypt repository credentials job_id=%s: EXPLOOP_SECRET_KEY lacks the key"
                 " they were sealed with", job.id)
    job.status, job.finished_at = "failed", utcnow()
    job.error = "the server could not decrypt this job's repository credentials; submit the job again"
    db.session.commit()
    _finished(job, "failed")


def _finished(job: Job, outcome: str) -> None:
    """Observe an attempt's duration and, for final states, the outcome."""
    if job.started_at:
        JOB_DURATION.labels(job.capability, job.region, outcome).observe(
            max(0.0, (utcnow() - job.started_at).total_seconds()))
    if job.status in FINAL_STATUSES:
        JOBS_FINISHED.labels(job.capability, job.region, job.status).inc()


def _held(agent: Agent, job_id: str, attempt: int, job_token: str | None) -> Job:
    """The job, if ``agent`` holds this attempt and presents its valid job token."""
    job = get_job(job_id)
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
    if job.status != JobStatus.RUNNING:
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
             job_token: str | None, incomplete: list[dict] | None = None) -> Job:
    """Store the findings and mark the job completed (repeating it is harmless)."""
    job = _held(agent, job_id, attempt, job_token)
    if job.status == JobStatus.COMPLETED:
        return job  # the agent retried a completion whose answer it lost
    if job.status != JobStatus.RUNNING:
        raise ApiError(409, f"job {job_id} is {job.status}", {"status": job.status})
    counts = {s: 0 for s in SEVERITIES}
    key = vault.tenant_fingerprint_key(job.tenant_id) if any(f.get("secret_hash") for f in findings) else None
    for item in findings:
        counts[item["severity"]] += 1
        fingerprint, secret_hash = vault.keyed_finding(item, _fingerprint(item), key)
        db.session.add(Finding(job_id=job.id, fingerprint=fingerprint, secret_hash=secret_hash, **{
            k: item.get(k) for k in ("rule_id", "severity", "confidence", "path", "start_line",
                                     "end_line", "message", "engine", "cwe", "preview", "commit")}))
    job.summary_json = json.dumps(dict(summary or {}, findings=len(findings), by_severity=counts))
    job.incomplete_json = json.dumps([{k: item.get(k) for k in ("path", "ecosystem", "reason")}
                                      for item in incomplete]) if incomplete else None
    job.status, job.progress, job.finished_at, job.error = JobStatus.COMPLETED, 100, utcnow(), None
    _end_attempt(job, JobStatus.COMPLETED)
    db.session.commit()
    _finished(job, JobStatus.COMPLETED)
    logger.info("job completed job_id=%s attempt=%s agent=%s tenant_id=%s findings=%d",
                job.id, attempt, agent.name, job.tenant_id, len(findings))
    admit_pending(job.tenant_id)
    return job


def requeue(job: Job, reason: str) -> Job:
    """Send a job back to the queue as attempt + 1, or fail it after max attempts."""
    if job.attempt >= job.max_attempts:
        job.status, job.finished_at = JobStatus.FAILED, utcnow()
        job.error = f"{reason} (attempt {job.attempt} of {job.max_attempts})"
        _end_attempt(job, "failed", reason)
        db.session.commit()
        JOBS_FINISHED.labels(job.capability, job.region, JobStatus.FAILED).inc()
        logger.error("job failed permanently job_id=%s attempts=%s reason=%s",
                     job.id, job.attempt, reason)
        admit_pending(job.tenant_id)
        return job
    _end_attempt(job, "requeued", reason)
    job.attempt += 1
    job.status, job.agent_id, job.error = JobStatus.QUEUED, None, reason
    job.queued_at, job.started_at, job.progress = utcnow(), None, 0
    job.job_token_hash = job.job_token_expires_at = job.run_deadline = None
    db.session.commit()
    logger.warning("job requeued job_id=%s attempt=%s reason=%s", job.id, job.attempt, reason)
    publish(job)
    return job


def requeue_running(agent: Agent, reason: str) -> int:
    """Requeue every job ``agent`` runs now (disabled, deleted, lease lost); how many."""
    running = db.session.scalars(select(Job).where(Job.agent_id == agent.id, Job.status == JobStatus.RUNNING)).all()
    for job in running:
        requeue(job, reason)
    return len(running)


def fail(agent: Agent, job_id: str, attempt: int, error: str, retry: bool,
         job_token: str | None) -> Job:
    """Record a failed attempt; retry it if asked and attempts remain."""
    job = _held(agent, job_id, attempt, job_token)
    if job.status == JobStatus.FAILED:
        return job
    if job.status != JobStatus.RUNNING:
        raise ApiError(409, f"job {job_id} is {job.status}", {"status": job.status})
    if retry:
        _finished(job, "retried")
        return requeue(job, error)
    job.status, job.finished_at, job.error = JobStatus.FAILED, utcnow(), error
    _end_attempt(job, JobStatus.FAILED, error)
    db.session.commit()
    _finished(job, JobStatus.FAILED)
    logger.error("job failed permanently job_id=%s attempt=%s agent=%s error=%s",
                 job.id, attempt, agent.name, error)
    admit_pending(job.tenant_id)
    return job


def retry(job: Job, actor: str) -> Job:
    """Give a failed or cancelled job a new attempt (``exploop-admin retry job``)."""
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
        raise ApiError(409, f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried",
                       {"status": job.status})
    if vault.split_credentials(job.repo_url)[1] is not None and job.repo_credentials is None:
        raise ApiError(409, f"job {job.id} cannot be retried: its repository credentials were deleted when"
                            " it ended; the tenant must submit it again",
                       {"reason": "credentials_deleted"})
    job.attempt += 1
    job.max_attempts = max(job.max_attempts, job.attempt)
    job.status, job.agent_id, job.finished_at, job.started_at = JobStatus.PENDING, None, None, None
    job.progress, job.error, job.cancelled_by = 0, None, None
    job.job_token_hash = job.job_token_expires_at = job.run_deadline = None
    job.admission_key = admission_key(utcnow(), job.priority)
    db.session.commit()
    logger.info("job retried job_id=%s attempt=%s by=%s", job.id, job.attempt, actor)
    admit_pending(job.tenant_id)
    db.session.refresh(job)
    return job


def cancel(job: Job, actor: str) -> Job:
    """Cancel a pending, queued or running job. A running scan stops on its agent at the
    agent's next check (its progress report is answered 409 cancelled), which frees the slot."""
    if job.status not in UNFINISHED_STATUSES:
        raise ApiError(409, f"job {job.id} is {job.status}; only pending, queued or running jobs"
                            " can be cancelled", {"status": job.status})
    was = job.status
    result = _execute(update(Job).where(Job.id == job.id, Job.status == was).values(
        status=JobStatus.CANCELLED, finished_at=utcnow(), cancelled_by=actor, error=f"cancelled by {actor}",
        repo_credentials=None))
    if result.rowcount == 1 and was == JobStatus.RUNNING:
        _end_attempt(job, JobStatus.CANCELLED, f"cancelled by {actor}")
    db.session.commit()
    db.session.refresh(job)
    if result.rowcount != 1:  # it changed under us (claimed, finished): say what it is now
        return cancel(job, actor) if job.status in UNFINISHED_STATUSES else job
    JOBS_FINISHED.labels(job.capability, job.region, JobStatus.CANCELLED).inc()
    logger.info("job cancelled job_id=%s was=%s by=%s tenant_id=%s agent=%s",
                job.id, was, actor, job.tenant_id, job.agent_name)
    admit_pending(job.tenant_id)
    return job


def adopt_incarnation(agent: Agent, incarnation: str) -> None:
    """Record the agent's current start; requeue at once what a previous start was running."""
    if agent.incarnation == incarnation:
        return
    previous = agent.incarnation
    # The guard makes two API processes seeing the same change at once requeue only once.
    won = _execute(update(Agent).where(
        Agent.id == agent.id, Agent.incarnation.is_(None) if previous is None else Agent.incarnation == previous)
        .values(incarnation=incarnation)).rowcount == 1
    db.session.commit()
    db.session.refresh(agent)
    if not won:
        return
    orphans = db.session.scalars(select(Job).where(
        Job.agent_id == agent.id, Job.status == JobStatus.RUNNING,
        (Job.incarnation != incarnation) | Job.incarnation.is_(None))).all()
    if previous is not None or orphans:
        logger.warning("agent restarted agent=%s incarnation=%s previous=%s orphaned_jobs=%d",
                       agent.name, incarnation, previous, len(orphans))
    for job in orphans:
        requeue(job, f"agent {agent.name} restarted (incarnation {previous} ended)")


def requeue_lost(agent: Agent, lost: list[dict]) -> None:
    """Jobs the agent says it no longer runs (a pool child died mid-job): requeue them now."""
    if not lost:
        return
    for item in lost:
        job = db.session.get(Job, str(item.get("job_id")))
        if job is not None and job.agent_id == agent.id and job.status == JobStatus.RUNNING \
                and job.attempt == item.get("attempt"):
            requeue(job, f"agent {agent.name} lost the job: {item.get('reason') or 'worker lost'}")
