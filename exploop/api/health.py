"""``/health`` (database and Redis reachable?) and ``/metrics`` (Prometheus)."""
from __future__ import annotations

from flask import Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from ..core.extensions import db
from . import Blueprint
from .collector import render_api_metrics
from .schemas import HealthOut

bp = Blueprint("health", __name__, description="Liveness and Prometheus metrics (no credential)")


def check_dependencies() -> dict[str, str]:
    """Return ``{"database": "ok" | "error: ...", "redis": ...}``."""
    checks = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        db.session.rollback()
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        # The short-timeout client: a hung Redis makes this answer "error" within
        # FLEET_READ_TIMEOUT rather than holding the request (and the operator) for its retries.
        current_app.extensions["redis_reads"].ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    return checks


@bp.get("/health")
@bp.response(200, HealthOut)
@bp.alt_response(503, schema=HealthOut, description="The database or Redis does not answer")
def health():
    """200 when the database and Redis answer, 503 otherwise."""
    checks = check_dependencies()
    healthy = all(value == "ok" for value in checks.values())
    return {"status": "ok" if healthy else "degraded", **checks}, 200 if healthy else 503


@bp.get("/metrics")
@bp.doc(responses={"200": {"description": "Prometheus text exposition format", "content": {
    "text/plain": {"schema": {"type": "string"}}}}})
def metrics():
    """Prometheus metrics: request latency, job histograms, queue depth, jobs, agents, capacity."""
    return Response(render_api_metrics(current_app), mimetype=CONTENT_TYPE_LATEST)
