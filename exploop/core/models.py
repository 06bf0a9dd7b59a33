"""Database models: the source of truth for tenants, agents, credentials, jobs and findings.

Typed SQLAlchemy 2.0 mappings: ``Mapped[X]`` is NOT NULL, ``Mapped[X | None]`` nullable.
"""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, event
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ..vocabulary import FINAL_STATUSES, DesiredState, JobStatus
from .extensions import Base, db

__all__ = ["utcnow", "Tenant", "Agent", "BootstrapToken", "AdminToken", "Job", "JobAttempt", "Finding",
           "AuditEvent"]

if TYPE_CHECKING:  # db.Model is Base with Flask-SQLAlchemy's query helpers, built at run time
    Model = Base
else:
    Model = db.Model


def utcnow() -> datetime:
    """Naive UTC now: every timestamp in the database is naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class Tenant(Model):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    plan: Mapped[str] = mapped_column(String(32), default="starter")
    # This tenant's key for secret fingerprints (HMAC), sealed with the server key (core.vault).
    fingerprint_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Agent(Model):
    __tablename__ = "agents"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    region: Mapped[str] = mapped_column(String(64), index=True)
    capabilities: Mapped[str] = mapped_column(String(100))  # comma separated
    max_jobs: Mapped[int] = mapped_column(Integer, default=5)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # What the admins want. The agent applies it on every renewal.
    desired_state: Mapped[str] = mapped_column(String(16), default=DesiredState.ACTIVE.value)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[str | None] = mapped_column(String(40))
    host: Mapped[str | None] = mapped_column(String(255))
    nodename: Mapped[str | None] = mapped_column(String(255))  # Celery node name, for remote control
    last_seen: Mapped[datetime | None] = mapped_column(DateTime)
    # Set by the controller when it finds the lease gone (logged once), cleared on renewal.
    lease_expired_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The agent's current start (an id it sends with every renewal and claim): a new one means
    # the previous process is gone, and the jobs it held are requeued at once.
    incarnation: Mapped[str | None] = mapped_column(String(64))
    # Set when the agent announced a graceful stop (released its lease); cleared on renewal.
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    @property
    def capability_list(self) -> list[str]:
        return [c for c in self.capabilities.split(",") if c]


class BootstrapToken(Model):
    __tablename__ = "bootstrap_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell tokens apart
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(100))
    revoke_reason: Mapped[str | None] = mapped_column(String(255))
    created_by: Mapped[str | None] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(String(255))
    # Constraints on what may register with this token (None: any).
    region: Mapped[str | None] = mapped_column(String(64))
    capabilities: Mapped[str | None] = mapped_column(String(100))  # comma separated: the agent's must be a subset
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AdminToken(Model):
    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16), default="admin")  # admin | viewer
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def _job_id() -> str:
    return uuid.uuid4().hex


class Job(Model):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),
                      Index("ix_jobs_tenant_status", "tenant_id", "status", "admission_key"),
                      # The controller's and the lists' indexed queries (migration 0004):
                      # queued jobs per queue in FIFO order (repair counts, queue positions),
                      # running jobs by deadline (time-outs), tenants with pending jobs (admission).
                      Index("ix_jobs_status_queue", "status", "capability", "region", "queued_at"),
                      Index("ix_jobs_status_deadline", "status", "run_deadline"),
                      Index("ix_jobs_status_tenant", "status", "tenant_id", "created_at"),
                      # Job lists, newest first: a tenant's, and everyone's by status.
                      Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
                      Index("ix_jobs_status_created", "status", "created_at", "id"),
                      # Pages of the admin job list walk this index alone (exploop.api.admin.jobs_page).
                      Index("ix_jobs_created_at_id", "created_at", "id"),
                      # Finished jobs by status and time: cluster-info's last day, the console's last hour.
                      Index("ix_jobs_status_finished_at", "status", "finished_at"))
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_job_id)
    tenant_id: Mapped[int] = mapped_column(Integer, ForeignKey("tenants.id"))
    capability: Mapped[str] = mapped_column(String(16))
    region: Mapped[str] = mapped_column(String(64))
    repo_url: Mapped[str] = mapped_column(String(2048))
    # Credentials never stored in clear: the URL keeps "***" in their place and they are
    # sealed with the server key in repo_credentials until the job reaches a final state.
    repo_credentials: Mapped[str | None] = mapped_column(Text)
    ref: Mapped[str] = mapped_column(String(255), default="HEAD")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING.value, index=True)
    priority: Mapped[str] = mapped_column(String(16), default="normal")
    # Admission order: created_at minus priority rank x PRIORITY_AGING (see jobs.admission_key).
    admission_key: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    time_limit: Mapped[int] = mapped_column(Integer)  # seconds
    agent_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("agents.id", ondelete="SET NULL"), index=True)
    agent_name: Mapped[str | None] = mapped_column(String(100))  # kept when the agent record is deleted
    incarnation: Mapped[str | None] = mapped_column(String(64))  # the agent start that claimed the current attempt
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    progress: Mapped[int] = mapped_column(Integer, default=0)
    progress_message: Mapped[str | None] = mapped_column(String(255))
    # The scoped job token of the current attempt (hash), given to the agent at claim.
    job_token_hash: Mapped[str | None] = mapped_column(String(64))
    job_token_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    cancelled_by: Mapped[str | None] = mapped_column(String(100))
    error: Mapped[str | None] = mapped_column(Text)
    summary_json: Mapped[str | None] = mapped_column(Text)
    # What a completed job could not check (JSON list of {path, ecosystem, reason}); NULL: all of it.
    incomplete_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    # started_at + time_limit while running: the controller times out jobs by this index.
    run_deadline: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)

    tenant: Mapped[Tenant] = relationship()

    @property
    def summary(self) -> dict | None:
        return json.loads(self.summary_json) if self.summary_json else None

    @property
    def incomplete(self) -> list[dict] | None:
        return json.loads(self.incomplete_json) if self.incomplete_json else None


class JobAttempt(Model):
    """One attempt of a job on one agent: the timeline operators read (claim to outcome)."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    agent_name: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    # running | completed | failed | requeued | cancelled
    outcome: Mapped[str] = mapped_column(String(16), default="running")
    reason: Mapped[str | None] = mapped_column(Text)


class Finding(Model):
    __tablename__ = "findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id"), index=True)
    rule_id: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(1024))
    start_line: Mapped[int | None] = mapped_column(Integer)
    end_line: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    engine: Mapped[str] = mapped_column(String(64))
    cwe: Mapped[str | None] = mapped_column(String(32))
    fingerprint: Mapped[str] = mapped_column(String(64))
    # Secrets only: a keyed hash (HMAC with the tenant's fingerprint key) and a masked
    # preview; the value itself and its plain hash are never stored.
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    preview: Mapped[str | None] = mapped_column(String(64))
    commit: Mapped[str | None] = mapped_column(String(64))


class AuditEvent(Model):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


@event.listens_for(Job, "before_insert")
@event.listens_for(Job, "before_update")
def _forget_credentials_at_the_end(mapper, connection, job: Job) -> None:
    """A job in a final state is never cloned again (an admin retry asks for a new submission):
    its sealed credentials go with the same write that ends it."""
    if job.status in FINAL_STATUSES:
        job.repo_credentials = None
