"""The controller: turns expired leases into offline agents and requeued jobs, times
jobs out, repairs Redis from the database, and admits pending jobs fairly.

Safe to run several: one leader at a time through a Redis lock; the others wait.
Every rule works from the database (the source of truth) and Redis (leases and
queues), so a controller can die at any point and the next one carries on.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, timedelta

from flask import Flask
from redis.exceptions import LockError
from sqlalchemy import func, select

from ..broker import decode_delivery
from ..routing import queue_for
from ..vocabulary import JobStatus
from . import handouts, jobs
from .extensions import db
from .models import Agent, Job, Tenant, utcnow

logger = logging.getLogger(__name__)

__all__ = ["Controller", "LEADER_KEY"]

LEADER_KEY = "exploop:controller:leader"
#: A job queued for longer than this without a message in Redis is published again.
REPUBLISH_AFTER = timedelta(seconds=5)
#: A running job is timed out this long after its time limit (the agent's own limit fires first).
TIMEOUT_GRACE = timedelta(seconds=60)


class Controller:
    """One controller process; ``tick()`` runs every rule once when leader."""

    def __init__(self, app: Flask, interval: float = 5.0):
        self.app = app
        self.interval = interval
        self.redis = app.extensions["redis"]
        self.broker = app.extensions["broker"]
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        # redis-py's Lock: compare-and-set acquire, extend and release, with our identity as token.
        self.leader_lock = self.redis.lock(LEADER_KEY, timeout=max(3 * interval, 3), thread_local=False)
        self.is_leader = False
        # Each agent's last lease seen: (renewed_at, lease_ttl, heartbeat_interval), for the
        # "outage, not crash" rule; and since when Redis has had no record of any renewal.
        self.seen: dict[str, tuple[float, float, float]] = {}
        self.keys_lost_since: float | None = None
        self._graced: dict[str, str] = {}  # agent -> why its grace was logged

    # --- leadership ---------------------------------------------------------------

    def lead(self) -> bool:
        """Take or keep the leader lock (TTL 3 intervals); return whether we lead."""
        try:
            if self.is_leader:
                self.leader_lock.reacquire()  # still ours: push its expiry out again
                leading = True
            else:
                leading = self.leader_lock.acquire(blocking=False, token=self.identity)
        except LockError:  # expired and taken by another controller, or flushed
            leading = False
        if leading != self.is_leader:
            logger.info("controller %s %s leadership", self.identity, "took" if leading else "lost")
        self.is_leader = leading
        return leading

    def resign(self) -> None:
        if self.is_leader:
            try:
                self.leader_lock.release()
            except LockError:
                pass
            self.is_leader = False

    # --- the loop -----------------------------------------------------------------

    def run_forever(self, should_stop=lambda: False) -> None:
        logger.info("controller %s started, interval %.1fs", self.identity, self.interval)
        while not should_stop():
            started = time.monotonic()
            try:
                if self.lead():
                    self.tick()
            except Exception:  # Redis or the database down: keep trying
                logger.exception("controller tick failed; retrying")
                with self.app.app_context():
                    db.session.rollback()
            elapsed = time.monotonic() - started
            time.sleep(max(0.1, self.interval - elapsed))
        self.resign()

    def tick(self) -> dict:
        """Run every rule once; return what each did (for logs and tests)."""
        with self.app.app_context():
            try:
                return {"expired": self.expire_leases(), "timed_out": self.time_out_jobs(),
                        "restored": self.restore_handouts(),
                        "republished": self.repair_queues(), "admitted": self.admit_fairly()}
            finally:
                db.session.remove()

    # --- rules ----------------------------------------------------------------------

    def expire_leases(self) -> int:
        """Agents whose lease is gone: log once, and requeue the jobs they were running.

        Not when the silence is the fleet's rather than the agent's: if nobody has renewed
        since this agent stopped (the API is down), or Redis lost its keys, or renewals only
        just resumed, the agent gets one lease TTL to renew and keep its jobs. An agent that
        announced a graceful stop is offline without the alert.
        """
        leases = self.app.extensions["leases"]
        agents = db.session.scalars(select(Agent).where(Agent.disabled.is_(False))).all()
        live = leases.get_many([a.name for a in agents])
        now = time.time()
        last_any, resumed = leases.fleet_renewals()
        if last_any is None:
            self.keys_lost_since = self.keys_lost_since or now
        else:
            self.keys_lost_since = None
        requeued = 0
        for agent in agents:
            lease = live.get(agent.name)
            if lease is not None:
                self.seen[agent.name] = (float(lease.get("renewed_at") or now),
                                         float(lease.get("lease_ttl") or lease.get("ttl") or 0),
                                         float(lease.get("heartbeat_interval") or 30))
                self._graced.pop(agent.name, None)
                continue
            running = db.session.scalars(select(Job).where(
                Job.agent_id == agent.id, Job.status == JobStatus.RUNNING)).all()
            if agent.stopped_at is not None:  # a graceful stop: its jobs finished (or were given back)
                for job in running:
                    jobs.requeue(job, f"agent {agent.name} stopped")
                    requeued += 1
                continue
            if self._outage_grace(agent, now, last_any, resumed):
                continue
            if agent.last_seen is not None and agent.lease_expired_at is None:
                agent.lease_expired_at = utcnow()
                db.session.commit()
                leases.forget(agent.key_hash)  # its next renewal goes through the database
                logger.error("lease expired agent=%s region=%s last_seen=%s",
                             agent.name, agent.region, agent.last_seen.isoformat())
            for job in running:
                jobs.requeue(job, f"lease expired on agent {agent.name}")
                requeued += 1
        return requeued

    def _outage_grace(self, agent: Agent, now: float, last_any: float | None, resumed: float | None) -> bool:
        """Whether to wait before calling this agent dead: the silence may be the fleet's."""
        # Unknown to this controller (it just started): the record's last_seen, else long ago.
        renewed_at, ttl, heartbeat = self.seen.get(agent.name) or (
            agent.last_seen.replace(tzinfo=UTC).timestamp() if agent.last_seen else 0.0, 0.0, 30.0)
        ttl = ttl or 3 * heartbeat
        if last_any is None:  # Redis lost its keys (restart, FLUSHALL): give renewals one TTL
            if now < (self.keys_lost_since or now) + ttl:
                self._log_grace(agent, "Redis lost its keys")
                return True
            return False
        if last_any < renewed_at + 1.5 * heartbeat:  # nobody renewed after this agent went quiet
            self._log_grace(agent, "renewals stopped fleet-wide")
            return True
        if resumed is not None and resumed > renewed_at and now < resumed + ttl:
            self._log_grace(agent, "renewals resumed after a fleet-wide outage")
            return True
        return False

    def _log_grace(self, agent: Agent, why: str) -> None:
        if self._graced.get(agent.name) != why:
            self._graced[agent.name] = why
            logger.warning("lease missing agent=%s: %s; waiting one lease TTL before requeuing its jobs",
                           agent.name, why)

    def time_out_jobs(self) -> int:
        """Running jobs past their time limit (plus grace) get another attempt."""
        now = utcnow()
        timed_out = 0
        for job in db.session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all():
            if job.started_at and job.started_at + timedelta(seconds=job.time_limit) + TIMEOUT_GRACE < now:
                if job.attempt < job.max_attempts:  # the last one: requeue logs "job failed permanently"
                    logger.warning("job timeout, will retry job_id=%s attempt=%s agent=%s",
                                   job.id, job.attempt, job.agent_name)
                jobs.requeue(job, f"job timeout after {job.time_limit}s on agent {job.agent_name}")
                timed_out += 1
        return timed_out

    def restore_handouts(self) -> int:
        """Jobs a poll handed out but nobody claimed in time go back to their queue, same attempt."""
        restored = handouts.restore_expired(self.broker.client)
        for handout in restored:
            logger.warning("handout expired, job back on its queue job_id=%s attempt=%s agent=%s queue=%s",
                           (decode_delivery(handout["raw"]) or ("?",))[0], handout["attempt"],
                           handout["agent"], handout["queue"])
        return len(restored)

    def repair_queues(self) -> int:
        """Publish again every queued job whose message is not in Redis (flushed, lost, never sent)."""
        cutoff = utcnow() - REPUBLISH_AFTER
        queued = db.session.scalars(select(Job).where(Job.status == JobStatus.QUEUED, Job.queued_at < cutoff)).all()
        if not queued:
            return 0
        present = self.broker.deliveries({queue_for(j.capability, j.region) for j in queued})
        present |= handouts.handed_out(self.broker.client)  # popped by a poll, waiting for its claim
        republished = 0
        for job in queued:
            if (job.id, job.attempt) not in present:
                logger.warning("job message missing from Redis, publishing again job_id=%s attempt=%s",
                               job.id, job.attempt)
                jobs.publish(job)
                republished += 1
        return republished

    def admit_fairly(self) -> int:
        """Admit pending jobs round-robin across tenants, within each tenant's limit."""
        tenants = db.session.scalars(
            select(Job.tenant_id).where(Job.status == JobStatus.PENDING).group_by(Job.tenant_id)
            .order_by(func.min(Job.created_at))).all()
        admitted = 0
        for tenant_id in tenants:
            if db.session.get(Tenant, tenant_id) is not None:
                admitted += jobs.admit_pending(tenant_id)
        return admitted
