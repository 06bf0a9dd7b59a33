"""Tenant endpoints (``/api/v1/*``): submit scans, follow them, fetch findings.

A tenant sees only its own jobs: another tenant's job is a 404, never a 403, so
existence does not leak.
"""
from __future__ import annotations

from flask import g, jsonify
from sqlalchemy import func, select

from ..core import jobs
from ..core.exceptions import ApiError
from ..core.extensions import db
from ..core.models import Finding, Job
from ..core.sarif import build_sarif
from ..core.vault import split_credentials
from ..vocabulary import JobStatus
from . import Blueprint
from .auth import tenant_required
from .schemas import (
    ErrorOut,
    Extended,
    FindingPage,
    IdempotencyArgs,
    JobCreate,
    JobCreated,
    JobListArgs,
    JobOut,
    JobPage,
    PageArgs,
)

bp = Blueprint("tenants", __name__, url_prefix="/api/v1",
               description="Tenant API (tenant key: rtenant_...)")


def paged(query, args):
    """Run ``query`` for one page; return the list envelope."""
    total = db.session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    items = db.session.scalars(query.limit(args["per_page"])
                               .offset((args["page"] - 1) * args["per_page"])).all()
    return {"items": items, "page": args["page"], "per_page": args["per_page"], "total": total}


def paged_jobs(query, args):
    """A page of jobs with their queue positions computed for the whole page at once."""
    return with_queue_positions(paged(query, args))


def with_queue_positions(envelope: dict) -> dict:
    """Set the page's queue positions, computed for the whole page in a few statements."""
    positions = jobs.queue_positions(envelope["items"])
    for job in envelope["items"]:
        job.page_queue_position = positions[job.id]  # read by JobOut (plain attribute, not a column)
    return envelope


def tenant_job(job_id: str) -> Job:
    return jobs.get_job(job_id, tenant_id=g.tenant.id)


@bp.post("/jobs")
@bp.arguments(JobCreate())
@bp.arguments(IdempotencyArgs(), location="headers")
@bp.response(201, JobCreated)
@bp.alt_response(200, schema=JobCreated, description="Replay of an earlier request with the same Idempotency-Key")
@bp.alt_response(400, schema=ErrorOut, description="Invalid request: a field fails its schema, or names an"
                 " unknown region (neither configured nor of a registered agent) or an unsupported repository URL")
@bp.errors(409, 429)
@tenant_required
def create_job(data, headers):
    """Submit a scan of a repository. Send ``Idempotency-Key`` to make retries safe.

    A retry with the same key answers 200 with the job the first request created; the
    same key with a different request is a client bug, answered 409.
    """
    key = headers.get("idempotency_key")
    job, created = jobs.submit(g.tenant, data, key)
    if not created and not _same_request(job, data):
        raise ApiError(409, f"Idempotency-Key {key!r} was used for a different request (job {job.id})",
                       {"reason": "idempotency_key_reused", "job": job.id})
    if created and data.get("region"):
        warning = jobs.unserved_warning(job.capability, job.region)
        if warning:
            return Extended(job, warning=warning), 201
    return job, 201 if created else 200


def _same_request(job: Job, data: dict) -> bool:
    """Does a replayed submission ask for what the job was created with?"""
    return (job.repo_url == split_credentials(data["repo_url"].strip(" "))[0] and job.capability == data["capability"]
            and job.ref == (data.get("ref") or "HEAD")
            and data.get("region") in (None, job.region))


@bp.get("/jobs")
@bp.arguments(JobListArgs(), location="query")
@bp.response(200, JobPage)
@tenant_required
def list_jobs(args):
    """List this tenant's jobs, newest first."""
    query = select(Job).where(Job.tenant_id == g.tenant.id)
    if args.get("status"):
        query = query.where(Job.status == args["status"])
    return paged_jobs(query.order_by(Job.created_at.desc(), Job.id.desc()), args)


@bp.get("/jobs/<job_id>")
@bp.response(200, JobOut)
@bp.errors(404)
@tenant_required
def get_job(job_id):
    """One job of this tenant."""
    return tenant_job(job_id)


@bp.post("/jobs/<job_id>/cancel")
@bp.response(200, JobOut)
@bp.errors(404, 409)
@tenant_required
def cancel_job(job_id):
    """Cancel a pending, queued or running job of this tenant (a running scan is stopped)."""
    return jobs.cancel(tenant_job(job_id), f"tenant:{g.tenant.name}")


@bp.get("/jobs/<job_id>/findings")
@bp.arguments(PageArgs(), location="query")
@bp.response(200, FindingPage)
@bp.errors(404)
@tenant_required
def list_findings(args, job_id):
    """Findings of one job of this tenant (secret values are never stored or returned)."""
    job = tenant_job(job_id)
    return paged(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id), args)


@bp.get("/jobs/<job_id>/sarif")
@bp.response(200, description="SARIF 2.1.0 log: one run per engine, one result per finding",
             content_type="application/sarif+json")
@bp.errors(404, 409)
@tenant_required
def job_sarif(job_id):
    """Findings of one completed job of this tenant as a SARIF 2.1.0 log."""
    job = tenant_job(job_id)
    if job.status != JobStatus.COMPLETED:
        raise ApiError(409, f"job {job_id} is {job.status}; SARIF is available once it has completed",
                       {"status": job.status})
    findings = db.session.scalars(select(Finding).where(Finding.job_id == job.id).order_by(Finding.id)).all()
    response = jsonify(build_sarif(job, findings))
    response.mimetype = "application/sarif+json"
    return response
