"""Database models: the source of truth for tenants, agents, credentials, jobs and findings."""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from sqlalchemy import Index, UniqueConstraint

from .extensions import db

__all__ = ["utcnow", "Tenant", "Agent", "BootstrapToken", "AdminToken", "Job", "JobAttempt", "Finding",
           "AuditEvent", "JOB_STATUSES", "ACTIVE_STATUSES", "FINAL_STATUSES"]

JOB_STATUSES = ("pending", "queued", "running", "completed", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("completed", "failed", "cancelled")


def utcnow() -> datetime:
    """Naive UTC now: every timestamp in the database is naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Tenant(db.Model):
    __tablename__ = "tenants"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(100), unique=True, nullable=False)
    key_hash = db.Column(db.String(64), unique=True, nullable=False)
    plan = db.Column(db.String(32), nullable=False, default="starter")
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)


class Agent(db.Model):
    __tablename__ = "agents"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(100), unique=True, nullable=False)
    region = db.Column(db.String(64), nullable=False, index=True)
    capabilities = db.Column(db.String(100), nullable=False)  # comma separated
    max_jobs = db.Column(db.Integer, nullable=False, default=5)
    key_hash = db.Column(db.String(64), unique=True, nullable=False)
    # What the admins want: "active" or "draining". The agent applies it on every renewal.
    desired_state = db.Column(db.String(16), nullable=False, default="active")
    disabled = db.Column(db.Boolean, nullable=False, default=False)
    version = db.Column(db.String(40))
    host = db.Column(db.String(255))
    nodename = db.Column(db.String(255))  # Celery node name, for remote control
    last_seen = db.Column(db.DateTime)
    # Set by the controller when it finds the lease gone (logged once), cleared on renewal.
    lease_expired_at = db.Column(db.DateTime)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)

    @property
    def capability_list(self) -> list[str]:
        return [c for c in self.capabilities.split(",") if c]


class BootstrapToken(db.Model):
    __tablename__ = "bootstrap_tokens"
    id = db.Column(db.Integer, primary_key=True)
    token_hash = db.Column(db.String(64), unique=True, nullable=False)
    prefix = db.Column(db.String(16), nullable=False)  # first characters, to tell tokens apart
    max_uses = db.Column(db.Integer, nullable=False, default=1)
    uses = db.Column(db.Integer, nullable=False, default=0)
    expires_at = db.Column(db.DateTime, nullable=False)
    revoked_at = db.Column(db.DateTime)
    revoked_by = db.Column(db.String(100))
    revoke_reason = db.Column(db.String(255))
    created_by = db.Column(db.String(100))
    description = db.Column(db.String(255))
    # Constraints on what may register with this token (None: any).
    region = db.Column(db.String(64))
    capabilities = db.Column(db.String(100))  # comma separated: the agent's must be a subset
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)


class AdminToken(db.Model):
    __tablename__ = "admin_tokens"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(100), nullable=False)
    role = db.Column(db.String(16), nullable=False, default="admin")  # admin | viewer
    token_hash = db.Column(db.String(64), unique=True, nullable=False)
    revoked_at = db.Column(db.DateTime)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow)


def _job_id() -> str:
    return uuid.uuid4().hex


class Job(db.Model):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),
                      Index("ix_jobs_tenant_status", "tenant_id", "status", "admission_key"),
                      # Pages of the admin job list walk this index alone (exploop.api.admin.jobs_page).
                      Index("ix_jobs_created_at_id", "created_at", "id"),
                      # Finished jobs by status and time: cluster-info's last day, the console's last hour.
                      Index("ix_jobs_status_finished_at", "status", "finished_at"))
    id = db.Column(db.String(32), primary_key=True, default=_job_id)
    tenant_id = db.Column(db.Integer, db.ForeignKey("tenants.id"), nullable=False)
    capability = db.Column(db.String(16), nullable=False)
    region = db.Column(db.String(64), nullable=False)
    repo_url = db.Column(db.String(2048), nullable=False)
    ref = db.Column(db.String(255), nullable=False, default="HEAD")
    status = db.Column(db.String(16), nullable=False, default="pending", index=True)
    priority = db.Column(db.String(16), nullable=False, default="normal")
    # Admission order: created_at minus priority rank x PRIORITY_AGING (see jobs.admission_key).
    admission_key = db.Column(db.DateTime, nullable=False, default=utcnow)
    attempt = db.Column(db.Integer, nullable=False, default=1)
    max_attempts = db.Column(db.Integer, nullable=False, default=3)
    time_limit = db.Column(db.Integer, nullable=False)  # seconds
    agent_id = db.Column(db.Integer, db.ForeignKey("agents.id", ondelete="SET NULL"), index=True)
    agent_name = db.Column(db.String(100))  # kept when the agent record is deleted
    idempotency_key = db.Column(db.String(255))
    progress = db.Column(db.Integer, nullable=False, default=0)
    progress_message = db.Column(db.String(255))
    # The scoped job token of the current attempt (hash), given to the agent at claim.
    job_token_hash = db.Column(db.String(64))
    job_token_expires_at = db.Column(db.DateTime)
    cancelled_by = db.Column(db.String(100))
    error = db.Column(db.Text)
    summary_json = db.Column(db.Text)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow, index=True)
    queued_at = db.Column(db.DateTime)
    started_at = db.Column(db.DateTime)
    finished_at = db.Column(db.DateTime)

    tenant = db.relationship("Tenant")

    @property
    def summary(self) -> dict | None:
        return json.loads(self.summary_json) if self.summary_json else None


class JobAttempt(db.Model):
    """One attempt of a job on one agent: the timeline operators read (claim to outcome)."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt"),)
    id = db.Column(db.Integer, primary_key=True)
    job_id = db.Column(db.String(32), db.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True)
    attempt = db.Column(db.Integer, nullable=False)
    agent_name = db.Column(db.String(100))
    started_at = db.Column(db.DateTime, nullable=False, default=utcnow)
    ended_at = db.Column(db.DateTime)
    # running | completed | failed | requeued | cancelled
    outcome = db.Column(db.String(16), nullable=False, default="running")
    reason = db.Column(db.Text)


class Finding(db.Model):
    __tablename__ = "findings"
    id = db.Column(db.Integer, primary_key=True)
    job_id = db.Column(db.String(32), db.ForeignKey("jobs.id"), nullable=False, index=True)
    rule_id = db.Column(db.String(200), nullable=False)
    severity = db.Column(db.String(16), nullable=False)
    confidence = db.Column(db.String(16))
    path = db.Column(db.String(1024), nullable=False)
    start_line = db.Column(db.Integer)
    end_line = db.Column(db.Integer)
    message = db.Column(db.Text, nullable=False)
    engine = db.Column(db.String(64), nullable=False)
    cwe = db.Column(db.String(32))
    fingerprint = db.Column(db.String(64), nullable=False)
    # Secrets only: a hash and a masked preview; the value itself is never stored.
    secret_hash = db.Column(db.String(64))
    preview = db.Column(db.String(64))
    commit = db.Column(db.String(64))


class AuditEvent(db.Model):
    __tablename__ = "audit_events"
    id = db.Column(db.Integer, primary_key=True)
    actor = db.Column(db.String(100), nullable=False)
    action = db.Column(db.String(64), nullable=False)
    target = db.Column(db.String(255))
    detail = db.Column(db.Text)
    created_at = db.Column(db.DateTime, nullable=False, default=utcnow, index=True)
