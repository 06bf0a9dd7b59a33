"""Agent endpoints (``/platform/*``): register, config, lease, and job reports."""
from __future__ import annotations

from flask import current_app, g, request

from .. import fleet, jobs
from ..config import parse_duration
from ..errors import ApiError
from ..security import AGENT_PREFIX, hash_token
from . import Blueprint
from .auth import agent_required, auth_failure, bearer_token, documented_auth
from .schemas import (AgentConfigOut, Extended, AttemptIn, ClaimOut, CompleteIn, FailIn, JobStateOut,
                      LeaseIn, LeaseOut, ProgressIn, RegisterIn, RegisterOut)

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
    config = current_app.config
    time_limit = int(parse_duration(config["JOB_TIME_LIMIT"]))
    return {"agent": g.agent,
            "broker_url": config["AGENT_BROKER_URL"] or current_app.extensions["celery"].conf.broker_url,
            "visibility_timeout": current_app.extensions["celery"].conf.broker_transport_options["visibility_timeout"],
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
    """Drop this agent's lease at once (graceful stop)."""
    current_app.extensions["leases"].release(g.agent.name)


@bp.post("/jobs/<job_id>/claim")
@bp.arguments(AttemptIn())
@bp.response(200, ClaimOut)
@bp.errors(403, 404, 409)
@agent_required
def claim(body, job_id):
    """Claim the current attempt of a queued job; 409 for a stale or duplicate delivery.
    The answer carries the scoped job token that progress, complete and fail require."""
    job, token = jobs.claim(g.agent, job_id, body["attempt"])
    return Extended(job, job_token=token)


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
    return jobs.complete(g.agent, job_id, body["attempt"], body["findings"], body["summary"], job_token())


@bp.post("/jobs/<job_id>/fail")
@bp.arguments(FailIn())
@bp.response(200, JobStateOut)
@bp.errors(403, 404, 409)
@agent_required
def fail(body, job_id):
    """Fail the current attempt of a job this agent holds (``retry`` requeues it)."""
    return jobs.fail(g.agent, job_id, body["attempt"], body["error"], body["retry"], job_token())
