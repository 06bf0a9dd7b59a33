"""Agent endpoints (``/platform/*``): register, config, lease, and job reports."""
from __future__ import annotations

import time

from flask import current_app, g, request

from ..config import parse_duration
from ..core import fleet, handouts, jobs, vault
from ..core.exceptions import ApiError
from ..core.extensions import db
from ..core.keyring import InvalidToken
from ..core.security import AGENT_PREFIX, hash_token
from ..routing import queues_for
from ..vocabulary import DesiredState
from . import Blueprint
from .auth import agent_required, auth_failure, bearer_token, documented_auth
from .schemas import (
    AgentConfigOut,
    ClaimIn,
    ClaimOut,
    CompleteIn,
    Extended,
    FailIn,
    JobStateOut,
    LeaseIn,
    LeaseOut,
    PollIn,
    PollOut,
    ProgressIn,
    RegisterIn,
    RegisterOut,
)

bp = Blueprint("platform", __name__, url_prefix="/platform",
               description="Endpoints platform agents call (agent key: ragent_...)")


@bp.post("/register")
@bp.arguments(RegisterIn())
@bp.response(201, RegisterOut)
@bp.errors(401, 403, 409, 429)
def register(data):
    """Exchange a bootstrap token for an agent record and its API key (shown once)."""
    try:
        agent, key = fleet.register_agent(data)
    except ApiError as exc:
        if exc.status == 401:  # an unknown, spent, expired or revoked bootstrap token
            raise auth_failure("bootstrap", exc) from None
        raise
    return Extended(agent, api_key=key)


@bp.get("/config")
@bp.response(200, AgentConfigOut)
@agent_required
def agent_config():
    """What an agent needs to run: its identity and the broker to consume from."""
    # An agent asks this once per start: its next renewal reads the record (and updates
    # version, host, max_jobs) instead of the cached identity of its previous run.
    fleet.forget_agent(g.agent)
    config = current_app.config
    time_limit = int(parse_duration(config["JOB_TIME_LIMIT"]))
    brokers = current_app.extensions["brokers"]
    broker = brokers.for_region(g.agent.region)
    url = broker.url
    if broker is brokers.default and config["AGENT_BROKER_URL"]:
        url = config["AGENT_BROKER_URL"]
    options = broker.celery.conf.broker_transport_options
    return {"agent": g.agent,
            "broker_url": url,
            # Everything kombu needs besides the URL: visibility_timeout, global_keyprefix,
            # and master_name for a sentinel:// broker.
            "broker_transport_options": {k: options[k] for k in ("visibility_timeout", "global_keyprefix",
                                                                 "master_name", "sep", "priority_steps")
                                         if k in options},
            "visibility_timeout": options["visibility_timeout"],
            "broker_key_prefix": broker.layout.prefix,
            "job_time_limit": time_limit,
            "max_poll_timeout": int(parse_duration(config["MAX_POLL_TIMEOUT"], "MAX_POLL_TIMEOUT"))}


@bp.put("/lease")
@bp.arguments(LeaseIn(), required=False)
@bp.response(200, LeaseOut)
@documented_auth("agent")
def renew_lease(body):
    """Renew this agent's lease; the answer carries its desired state and lease TTL."""
    token = bearer_token()
    if token and token.startswith(AGENT_PREFIX):
        reply = fleet.renew_lease_cached(hash_token(token), body)
        if reply is not None:
            return reply
    return _renew_from_database(body)


@agent_required
def _renew_from_database(body):
    return fleet.renew_lease(g.agent, body)


@bp.delete("/lease")
@bp.response(204)
@agent_required
def release_lease():
    """Announce a graceful stop: the lease goes at once, the agent shows ``offline`` (stopped)
    and the controller raises no "lease expired" for it."""
    fleet.release_lease(g.agent)


@bp.post("/poll")
@bp.arguments(PollIn(), required=False)
@bp.response(200, PollOut)
@bp.alt_response(204, description="no job came within the timeout")
@bp.errors(503)
@agent_required
def poll(body):
    """Long-poll for a job on this agent's ``<cap>.<region>`` queues (HTTP agents).

    Held up to ``timeout`` seconds (capped by MAX_POLL_TIMEOUT). The job is handed out
    to this agent only: claim it with ``handout_id`` within ``claim_within`` seconds, or
    it goes back to its queue with its attempt unchanged. A draining agent gets none."""
    config = current_app.config
    hold = min(body["timeout"], parse_duration(config["MAX_POLL_TIMEOUT"], "EXPLOOP_MAX_POLL_TIMEOUT"))
    window = parse_duration(config["POLL_CLAIM_WINDOW"], "EXPLOOP_POLL_CLAIM_WINDOW")
    agent = g.agent
    name, draining = agent.name, agent.desired_state != DesiredState.ACTIVE
    queues = queues_for(agent.capability_list, agent.region)
    # Give the database connection back before blocking: a held poll must not pin one.
    db.session.remove()
    if draining:
        time.sleep(hold)
        return "", 204
    broker = current_app.extensions["brokers"].for_region(agent.region)
    handout = handouts.pop(name, queues, hold, window, broker)
    if handout is None:
        return "", 204
    current_app.logger.info("job handed out job_id=%s attempt=%s agent=%s handout_id=%s",
                            handout["job_id"], handout["attempt"], name, handout["handout_id"])
    return handout


@bp.post("/jobs/<job_id>/claim")
@bp.arguments(ClaimIn())
@bp.response(200, ClaimOut)
@bp.errors(403, 404, 409)
@agent_required
def claim(body, job_id):
    """Claim the current attempt of a queued job; 409 for a stale or duplicate delivery.
    With ``handout_id`` (HTTP agents), the poll's handout must still be this agent's and
    unexpired, else 409 "handout expired": the job went back to its queue for another.
    The answer carries the scoped job token that progress, complete and fail require."""
    handout = None
    broker = current_app.extensions["brokers"].for_region(g.agent.region)
    if body.get("handout_id"):
        handout, why = handouts.take(job_id, body["handout_id"], g.agent.name, broker)
        if handout is None:
            raise ApiError(409, "handout expired", {"reason": "handout expired", "handout": why})
    try:
        job, token = jobs.claim(g.agent, job_id, body["attempt"], body.get("incarnation"))
    except ApiError as exc:
        if handout is not None and isinstance(exc.detail, dict) and exc.detail.get("reason") == "draining":
            handouts.put_back(handout, broker)  # a draining agent's job is for another agent
        raise
    try:
        repo_url = vault.agent_repo_url(job)
    except InvalidToken:
        jobs.fail_unreadable_credentials(job)
        raise ApiError(409, f"job {job_id} attempt {body['attempt']} is not claimable",
                       {"reason": "stale", "status": job.status, "attempt": job.attempt}) from None
    # The only place a credential leaves the database: to the agent holding this attempt.
    return Extended(job, job_token=token, repo_url=repo_url,
                    destinations=current_app.extensions["destinations"].to_dict())


def job_token() -> str | None:
    """The scoped job token (``X-Job-Token``) that goes with the agent key."""
    return request.headers.get("X-Job-Token")


@bp.post("/jobs/<job_id>/progress")
@bp.arguments(ProgressIn())
@bp.response(200, JobStateOut)
@bp.errors(403, 404, 409)
@agent_required
def progress(body, job_id):
    """Report progress of a job this agent holds."""
    return jobs.progress(g.agent, job_id, body["attempt"], body["progress"], body.get("message"),
                         job_token())


@bp.post("/jobs/<job_id>/complete")
@bp.arguments(CompleteIn())
@bp.response(200, JobStateOut)
@bp.errors(403, 404, 409)
@agent_required
def complete(body, job_id):
    """Store findings and complete a job this agent holds."""
    return jobs.complete(g.agent, job_id, body["attempt"], body["findings"], body["summary"], job_token(),
                         body.get("incomplete"))


@bp.post("/jobs/<job_id>/fail")
@bp.arguments(FailIn())
@bp.response(200, JobStateOut)
@bp.errors(403, 404, 409)
@agent_required
def fail(body, job_id):
    """Fail the current attempt of a job this agent holds (``retry`` requeues it)."""
    return jobs.fail(g.agent, job_id, body["attempt"], body["error"], body["retry"], job_token())
