"""The admin console (``/ui/``): the fleet in server-rendered pages, with the runbook's actions.

Every page and action calls the same functions as the admin API (``exploop.api.admin``)
with the signed-in admin token's name as the actor, so the console and ``exploop-admin``
can never disagree. Sign-in takes an admin token; the session lives in Redis
(:mod:`exploop.api.console_session`). Viewers see everything and change nothing: their
pages carry no action buttons and a forged POST is refused (403) and audited, as on the API.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, current_app, g, jsonify, redirect, render_template, request, url_for
from marshmallow import Schema, ValidationError
from sqlalchemy import func, select
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from ..config import CAPABILITIES, parse_duration
from ..core import fleet, jobs
from ..core.exceptions import ApiError
from ..core.extensions import db
from ..core.fleet import audit, create_bootstrap_token
from ..core.models import AdminToken, Agent, AuditEvent, BootstrapToken, Finding, Job, Tenant
from ..core.sarif import build_sarif
from ..core.security import security_event
from ..redaction import redact_url
from ..vocabulary import JOB_STATUSES, WAITING_STATUSES
from . import admin
from .auth import find_admin_token, refuse_credential
from .console_fleet import hour_series, placements, sparkline
from .console_session import COOKIE, LOGIN_COOKIE, SECURITY_HEADERS, SessionStore, clear_cookie, same_token, set_cookie
from .schemas import AdminJobListArgs, AgentListArgs, AuditListArgs, PageArgs, TokenCreate

logger = logging.getLogger(__name__)

__all__ = ["bp", "init_console"]

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates",
               static_folder="static/console", static_url_path="/static")

#: Pages anyone may open: the sign-in form and the console's own static files.
PUBLIC = {"console.login", "console.static"}
#: Changes a viewer may make: ending their own session.
ANY_ROLE = {"console.logout"}
FINDINGS_SHOWN = 200
#: Waiting jobs shown per tenant, with their queue position.
WAITING_SHOWN = 5


def init_console(app) -> None:
    """Register the console on the app, with its session store."""
    idle = parse_duration(app.config["CONSOLE_IDLE_TIMEOUT"], "EXPLOOP_CONSOLE_IDLE_TIMEOUT")
    parse_duration(app.config["CONSOLE_REFRESH"], "EXPLOOP_CONSOLE_REFRESH")
    app.extensions["console_sessions"] = SessionStore(app.extensions["redis"], int(idle))
    app.register_blueprint(bp)


def _sessions() -> SessionStore:
    return current_app.extensions["console_sessions"]


# --- session, CSRF, roles, headers ------------------------------------------------

@bp.before_request
def _start_timer():
    g.console_started = time.perf_counter()


@bp.before_request
def _require_session():
    if request.endpoint in PUBLIC:
        return None
    session_id = request.cookies.get(COOKIE)
    data = _sessions().load(session_id)
    token = db.session.get(AdminToken, data["token_id"]) if data else None
    if data is None or token is None or token.revoked_at is not None:
        _sessions().end(session_id)
        if request.method == "GET" and request.endpoint not in ("console.agent_rows", "console.agent_live"):
            return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
        return _page("error.html", 401, message="Your session has ended; sign in again.")
    g.admin, g.console, g.session_id = token, data, session_id
    if request.method != "POST":
        return None
    if not same_token(request.form.get("csrf_token"), data["csrf"]):
        security_event("access_denied", "admin", f"token={token.name} reason=csrf path={request.path}")
        audit(token.name, "csrf refused", f"POST {request.path}")
        db.session.commit()
        return _page("error.html", 403, message="This form is no longer valid (CSRF check failed).")
    if token.role != "admin" and request.endpoint not in ANY_ROLE:
        security_event("access_denied", "admin", f"token={token.name} role={token.role} path={request.path}")
        audit(token.name, "permission denied", f"POST {request.path}", f"role={token.role}")
        db.session.commit()
        return _page("error.html", 403, message=f"Admin token {token.name!r} has role {token.role!r};"
                                                " this action needs 'admin'.")
    return None


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    started = g.get("console_started")
    if started is not None:  # time spent in the app, for operators and bench/console.py
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.app_context_processor
def _template_globals() -> dict:
    admin_token = g.get("admin")
    return {"admin": admin_token, "can_change": admin_token is not None and admin_token.role == "admin",
            "csrf_token": (g.get("console") or {}).get("csrf", ""), "capabilities": CAPABILITIES,
            "refresh_ms": int(parse_duration(current_app.config["CONSOLE_REFRESH"]) * 1000)}


@bp.errorhandler(ApiError)
def _api_error(error: ApiError):
    return _page("error.html", error.status, message=error.message, detail=error.detail)


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException):
    return _page("error.html", error.code or 500, message=error.description)


def _page(template: str, status: int = 200, **context):
    """Render a console page, with the notice left by the previous action (shown once)."""
    notice = None
    data = g.get("console")
    if data and data.get("notice"):
        notice = data.pop("notice")
        _sessions().save(g.session_id, data)
    return render_template(f"console/{template}", notice=notice, **context), status


def _notify(message: str, kind: str = "ok") -> None:
    g.console["notice"] = {"message": message, "kind": kind}
    _sessions().save(g.session_id, g.console)


def _args(schema: Schema) -> dict:
    """Query filters validated by the admin API's own schema (empty fields mean no filter)."""
    given = {k: v for k, v in request.args.items() if v.strip()}
    try:
        return schema.load(given)
    except ValidationError as exc:
        raise ApiError(400, "invalid filter", exc.messages) from None


def _back(default: str) -> Response:
    target = request.form.get("next") or default
    return redirect(target if target.startswith("/ui/") and not target.startswith("//") else default)


def _act(default: str, action: Callable[[], Any], done: str | Callable[[Any], str]) -> Response:
    """Run an admin action; tell its outcome on the next page (an ApiError is shown, not raised).

    ``done`` is the message, or makes it from the action's result.
    """
    try:
        result = action()
    except ApiError as exc:
        db.session.rollback()
        _notify(exc.message, "error")
    else:
        _notify(done(result) if callable(done) else done)
    return _back(default)


# --- sign-in ----------------------------------------------------------------------

@bp.route("/login", methods=["GET", "POST"])
def login():
    """Sign in with an admin token; failures count toward the auth-failure ban like the API's."""
    error = None
    status = 200
    if request.method == "POST":
        if not same_token(request.form.get("csrf_token"), request.cookies.get(LOGIN_COOKIE)):
            error, status = "The sign-in form expired; try again.", 403
        else:
            token = find_admin_token(request.form.get("token", "").strip())
            if token is None or token.revoked_at is not None:
                refused = refuse_credential("admin", "revoked" if token is not None else None)
                error, status = (refused.message if refused.status == 429 else "Sign-in failed: unknown or"
                                 " revoked admin token."), refused.status
                response = _login_form(error, status)
                if refused.status == 429:
                    response.headers["Retry-After"] = refused.headers.get("Retry-After", "")
                return response
            session_id, _ = _sessions().create(token.id)
            audit(token.name, "console sign in", None, f"role={token.role}")
            db.session.commit()
            target = request.args.get("next", "")
            response = redirect(target if target.startswith("/ui/") and not target.startswith("//")
                                else url_for("console.fleet_page"))
            set_cookie(response, COOKIE, session_id, "/ui/")
            clear_cookie(response, LOGIN_COOKIE, "/ui/login")
            return response
    return _login_form(error, status)


def _login_form(error: str | None, status: int) -> Response:
    form_token = secrets.token_urlsafe(32)
    response = Response(render_template("console/login.html", error=error, login_csrf=form_token), status,
                        mimetype="text/html")
    set_cookie(response, LOGIN_COOKIE, form_token, "/ui/login", max_age=3600)
    return response


@bp.post("/logout")
def logout():
    """Sign out: the session ends on the server and the cookie is cleared."""
    _sessions().end(g.session_id)
    response = redirect(url_for("console.login"))
    clear_cookie(response, COOKIE, "/ui/")
    return response


# --- fleet ------------------------------------------------------------------------

@bp.get("/")
def fleet_page():
    """Fleet: placements by region x capability, problems first, and the last hour."""
    snapshot = fleet.fleet_snapshot()
    series = hour_series()
    overview = admin.cluster_overview(snapshot)
    return _page("fleet.html", overview=overview, rows=placements(snapshot, overview["queues"]),
                 step=series["step_minutes"],
                 throughput=sparkline(series["throughput"]), waiting=sparkline(series["waiting"]))


# --- agents -----------------------------------------------------------------------

def _agent_filters() -> tuple[dict, dict]:
    args = _args(AgentListArgs())
    shown = {k: v for k, v in args.items() if k not in ("page", "per_page")}
    return args, shown


@bp.get("/agents")
def agents_page():
    """Agents: ``get agents`` with filters, refreshed live."""
    args, shown = _agent_filters()
    page = admin.agents_page(args)
    return _page("agents.html", page=page, filters=shown, query=urlencode(request.args),
                 regions=_regions(), pages=_pages(page, "console.agents_page"))


@bp.get("/agents/rows")
def agent_rows():
    """The agents table body for the live refresh: one request per interval per open page."""
    args, _ = _agent_filters()
    page = admin.agents_page(args)
    return render_template("console/_agent_rows.html", page=page)


def _regions() -> list[str]:
    return list(db.session.scalars(select(Agent.region).distinct().order_by(Agent.region)))


def _pages(page: dict, endpoint: str, **values) -> dict:
    """Previous / next links that keep the filters."""
    last = max(1, -(-page["total"] // page["per_page"]))
    args = {k: v for k, v in request.args.items() if k != "page" and v.strip()}

    def link(number: int) -> str | None:
        return url_for(endpoint, **{**values, **args, "page": number}) if 1 <= number <= last else None
    return {"number": page["page"], "last": last, "prev": link(page["page"] - 1), "next": link(page["page"] + 1)}


def _agent_context(name: str) -> dict:
    view = admin.agent_detail(name)  # 404 for an unknown agent; its running job ids from the job records
    running = db.session.scalars(select(Job).where(Job.id.in_(view["running_jobs"]))
                                 .order_by(Job.started_at)).all()
    registered = db.session.scalar(select(AuditEvent).where(
        AuditEvent.target == name, AuditEvent.action.in_(("register agent", "create agent")))
        .order_by(AuditEvent.id.desc()).limit(1))
    token = None
    if registered is not None and registered.actor.startswith("bootstrap:"):
        token = db.session.scalar(select(BootstrapToken).where(
            BootstrapToken.prefix == registered.actor.removeprefix("bootstrap:")))
    return {"agent": view, "running": running, "registered": registered, "token": token}


@bp.get("/agents/<name>")
def agent_page(name):
    """Agent: ``describe agent``, with the lease TTL counting down."""
    return _page("agent.html", **_agent_context(name))


@bp.get("/agents/<name>/live")
def agent_live(name):
    """The agent page's live panel (status, lease, running jobs)."""
    return render_template("console/_agent_live.html", **_agent_context(name))


@bp.post("/agents/<name>/drain")
def drain_agent(name):
    return _act(url_for("console.agent_page", name=name),
                lambda: admin.set_desired_state(name, "draining", g.admin.name), f"Agent {name} is draining.")


@bp.post("/agents/<name>/uncordon")
def uncordon_agent(name):
    return _act(url_for("console.agent_page", name=name),
                lambda: admin.set_desired_state(name, "active", g.admin.name), f"Agent {name} is active again.")


@bp.post("/agents/<name>/disable")
def disable_agent(name):
    return _act(url_for("console.agent_page", name=name), lambda: admin.set_disabled(name, True, g.admin.name),
                lambda view: f"Agent {name} disabled: it takes no jobs until enabled"
                + (f"; {view['requeued_jobs']} running job{'s' * (view['requeued_jobs'] != 1)} requeued."
                   if view["requeued_jobs"] else "."))


@bp.post("/agents/<name>/enable")
def enable_agent(name):
    return _act(url_for("console.agent_page", name=name), lambda: admin.set_disabled(name, False, g.admin.name),
                f"Agent {name} enabled: it takes jobs again from its next lease renewal.")


@bp.post("/agents/<name>/delete")
def delete_agent(name):
    return _act(url_for("console.agents_page"), lambda: admin.remove_agent(name, g.admin.name),
                f"Agent {name} deleted.")


# --- jobs -------------------------------------------------------------------------

@bp.get("/jobs")
def jobs_page():
    """Jobs: filters and paging, as ``GET /admin/v1/jobs``."""
    args = _args(AdminJobListArgs())
    page = admin.jobs_page(args)
    filters = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
    return _page("jobs.html", page=page, filters=filters, regions=_regions(),
                 tenants=list(db.session.scalars(select(Tenant.name).order_by(Tenant.name).limit(500))),
                 statuses=JOB_STATUSES,
                 pages=_pages(page, "console.jobs_page"), redact_url=redact_url)


@bp.get("/jobs/<job_id>")
def job_page(job_id):
    """Job: its attempts one by one, findings by severity, retry and cancel."""
    job = admin.find_job(job_id)
    by_severity = dict(db.session.execute(select(Finding.severity, func.count()).where(Finding.job_id == job.id)
                                          .group_by(Finding.severity)).all())
    findings = db.session.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id)
                                  .limit(FINDINGS_SHOWN)).all()
    return _page("job.html", job=job, attempts=jobs.attempts_of(job), by_severity=by_severity,
                 severities=jobs.SEVERITIES, findings=findings, repo_url=redact_url(job.repo_url),
                 position=jobs.queue_position(job))


@bp.get("/jobs/<job_id>/sarif")
def job_sarif(job_id):
    """The job's findings as SARIF 2.1.0 (the tenant API's document, for admins)."""
    job = admin.find_job(job_id)
    if job.status != "completed":
        raise ApiError(409, f"job {job_id} is {job.status}; SARIF is available once it has completed")
    findings = db.session.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id)).all()
    response = jsonify(build_sarif(job, findings))
    response.mimetype = "application/sarif+json"
    response.headers["Content-Disposition"] = f'attachment; filename="{job.id}.sarif"'
    return response


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id):
    return _act(url_for("console.job_page", job_id=job_id), lambda: admin.retry_job_as(job_id, g.admin.name),
                f"Job {job_id} retried.")


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id):
    return _act(url_for("console.job_page", job_id=job_id), lambda: admin.cancel_job_as(job_id, g.admin.name),
                f"Job {job_id} cancelled.")


# --- tokens, tenants, audit ---------------------------------------------------------

@bp.get("/tokens")
def tokens_page(created: dict | None = None, errors: dict | None = None, status: int = 200):
    """Tokens: bootstrap tokens with status and uses; create and revoke."""
    page = admin.tokens_page(_args(PageArgs()))
    return _page("tokens.html", status, page=page, created=created, errors=errors,
                 pages=_pages(page, "console.tokens_page"))


@bp.post("/tokens")
def create_token():
    """Create a bootstrap token; its value is in this response only (never stored, never shown again)."""
    form: dict[str, object] = {"max_uses": request.form.get("max_uses", "1"),
                               "expires": request.form.get("expires", "1h")}
    if request.form.get("region", "").strip():
        form["region"] = request.form["region"].strip()
    if request.form.getlist("capabilities"):
        form["capabilities"] = request.form.getlist("capabilities")
    if request.form.get("description", "").strip():
        form["description"] = request.form["description"].strip()
    try:
        form["max_uses"] = int(str(form["max_uses"]))
        data = TokenCreate().load(form)
    except (ValueError, ValidationError) as exc:
        messages: dict = exc.messages if isinstance(exc, ValidationError) and isinstance(exc.messages, dict) \
            else {"max_uses": ["not an integer"]}
        return tokens_page(errors=messages, status=400)
    token, raw = create_bootstrap_token(g.admin.name, data["max_uses"], data["expires"], region=data.get("region"),
                                        capabilities=data.get("capabilities"), description=data.get("description"))
    return tokens_page(created={"prefix": token.prefix, "value": raw}, status=201)


@bp.post("/tokens/<int:token_id>/revoke")
def revoke_token(token_id):
    reason = request.form.get("reason", "").strip()[:255] or None
    return _act(url_for("console.tokens_page"),
                lambda: admin.revoke_bootstrap_token(token_id, g.admin.name, reason), f"Token {token_id} revoked.")


@bp.get("/tenants")
def tenants_page():
    """Tenants: plan, usage against its limits, and where their waiting jobs stand."""
    page = admin.tenants_page(_args(PageArgs()))
    # The first waiting jobs of every tenant on the page, in one query (a window per tenant).
    ranked = select(Job.id, func.row_number().over(partition_by=Job.tenant_id, order_by=(Job.admission_key, Job.id))
                    .label("n")).where(Job.tenant_id.in_([t.id for t in page["items"]]),
                                       Job.status.in_(WAITING_STATUSES)).subquery()
    waiting: dict[int, list[Job]] = {tenant.id: [] for tenant in page["items"]}
    for job in db.session.scalars(select(Job).join(ranked, Job.id == ranked.c.id).where(ranked.c.n <= WAITING_SHOWN)
                                  .order_by(Job.admission_key, Job.id)):
        waiting[job.tenant_id].append(job)
    positions = jobs.queue_positions([job for shown in waiting.values() for job in shown])
    counts = jobs.status_counts_by_tenant([tenant.id for tenant in page["items"]])
    rows = [{"tenant": admin.tenant_usage(tenant, counts[tenant.id]),
             "waiting": [(job, positions.get(job.id)) for job in waiting[tenant.id]]} for tenant in page["items"]]
    return _page("tenants.html", page=page, rows=rows, pages=_pages(page, "console.tenants_page"))


@bp.get("/audit")
def audit_page():
    """Audit: who did what, filterable."""
    page = admin.audit_page(_args(AuditListArgs()))
    filters = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
    return _page("audit.html", page=page, filters=filters, pages=_pages(page, "console.audit_page"))
