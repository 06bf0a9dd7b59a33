"""The controller: turns expired leases into offline agents and requeued jobs, times
jobs out, repairs Redis from the database, and admits pending jobs fairly.

Safe to run several: one leader at a time through a Redis lock; the others wait.
Every rule works from the database (the source of truth) and Redis (leases and
queues), so a controller can die at any point and the next one carries on.

A tick costs what changed, not what exists: lease expiry starts from the index of
lease deadlines (only agents whose deadline passed), queue repair compares counts
of the broker's data (a marker key, the server's run id) and reads a queue only when
it is suspect, time-outs and admission are
indexed queries. Every ``full_check_every`` ticks a full check looks at every agent
and reads one queue whole (in turn), which covers what the cheap paths cannot see:
an index lost with a flushed Redis, a lost message hidden by a stale one.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from datetime import UTC, timedelta

import redis
from flask import Flask
from kombu.exceptions import OperationalError
from redis.exceptions import LockError
from sqlalchemy import exists, func, literal, select, union_all

from ..broker import Broker, decode_delivery, redact
from ..config import CAPABILITIES
from ..routing import parse_queue, queue_for
from ..vocabulary import JobStatus
from . import handouts, jobs
from .extensions import db
from .models import Agent, Job, utcnow

logger = logging.getLogger(__name__)

__all__ = ["Controller", "LEADER_KEY"]

LEADER_KEY = "exploop:controller:leader"
#: A key in each broker's Redis: gone after a FLUSHALL, which tells the controller to check every queue.
BROKER_MARKER = "exploop:broker-marker"
#: A job queued for longer than this without a message in Redis is published again.
REPUBLISH_AFTER = timedelta(seconds=5)
#: A queued job whose only message was delivered to a worker that never claimed it is published
#: again after this (a claim follows a delivery within moments).
UNACKED_GRACE = timedelta(seconds=60)
#: A running job is timed out this long after its time limit (the agent's own limit fires first).
TIMEOUT_GRACE = timedelta(seconds=60)


class Controller:
    """One controller process; ``tick()`` runs every rule once when leader."""

    def __init__(self, app: Flask, interval: float = 5.0, full_check_every: int = 12):
        self.app = app
        self.interval = interval
        self.redis = app.extensions["redis"]
        self.brokers = app.extensions["brokers"]
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        # redis-py's Lock: compare-and-set acquire, extend and release, with our identity as token.
        self.leader_lock = self.redis.lock(LEADER_KEY, timeout=max(3 * interval, 3), thread_local=False)
        self.is_leader = False
        # Since when Redis has had no record of any renewal (the "outage, not crash" rule), and
        # which agents' grace was logged (once per reason).
        self.keys_lost_since: float | None = None
        self._graced: dict[str, str] = {}
        #: Every this many ticks (a minute at the default interval), a full check; the first tick is one.
        self.full_check_every = max(1, full_check_every)
        self.ticks = 0
        self._next_queue = 0  # the full check's cursor over queues
        self._queues: set[str] | None = None  # queues jobs may be on (refreshed by full checks)
        self._epochs: dict[str, str] = {}  # broker URL -> "run_id:marker" seen last tick

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

    def tick(self, full: bool | None = None) -> dict:
        """Run every rule once; return what each did (for logs and tests)."""
        if full is None:
            full = self.ticks % self.full_check_every == 0
        self.ticks += 1
        with self.app.app_context():
            try:
                return {"expired": self.expire_leases(full), "timed_out": self.time_out_jobs(),
                        "restored": self.restore_handouts(),
                        "republished": self.repair_queues(full), "admitted": self.admit_fairly()}
            finally:
                db.session.remove()

    # --- rules ----------------------------------------------------------------------

    def lease_candidates(self, full: bool) -> tuple[list[Agent], list[str]]:
        """Agents whose lease may have expired, and the index entries they came from.

        Normally the agents whose deadline in the lease index has passed; on a full check
        every enabled agent (an index flushed with Redis, an agent that never renewed).
        """
        leases = self.app.extensions["leases"]
        due = leases.due()
        names = due
        if full:  # names only, then rows for the agents without a lease
            every = db.session.scalars(select(Agent.name).where(Agent.disabled.is_(False))).all()
            alive = leases.present(every)
            names = sorted({name for name in every if name not in alive} | set(due))
        agents: list[Agent] = []
        for start in range(0, len(names), 1000):  # bounded IN lists (SQLite caps parameters)
            agents += db.session.scalars(select(Agent).where(
                Agent.disabled.is_(False), Agent.name.in_(names[start:start + 1000]))).all()
        return agents, due

    def expire_leases(self, full: bool = True) -> int:
        """Agents whose lease is gone: log once, and requeue the jobs they were running.

        Not when the silence is the fleet's rather than the agent's: if nobody has renewed
        since this agent stopped (the API is down), or Redis lost its keys, or renewals only
        just resumed, the agent gets one lease TTL to renew and keep its jobs (it stays in
        the deadline index meanwhile). An agent that announced a graceful stop is offline
        without the alert.
        """
        leases = self.app.extensions["leases"]
        agents, due = self.lease_candidates(full)
        now = time.time()
        last_any, resumed = leases.fleet_renewals()
        if last_any is None:
            self.keys_lost_since = self.keys_lost_since or now
        else:
            self.keys_lost_since = None
        if not agents:
            leases.settle(due)  # deleted or disabled agents
            return 0
        alive = leases.present([a.name for a in agents])
        offline = [a for a in agents if a.name not in alive]
        for name in alive:
            self._graced.pop(name, None)
        renewals = leases.last_renewals([a.name for a in offline]) if offline else {}
        busy = set(db.session.scalars(select(Job.agent_id).where(
            Job.status == JobStatus.RUNNING, Job.agent_id.in_([a.id for a in offline])).distinct())) if offline else set()
        requeued = 0
        waiting: set[str] = set()
        for agent in offline:
            if agent.stopped_at is None and self._outage_grace(agent, now, last_any, resumed,
                                                               renewals.get(agent.name)):
                waiting.add(agent.name)
                continue
            requeued += self.expire_agent(agent, agent.id in busy)
        # Handled: out of the index (an agent renewed meanwhile keeps its new deadline; one
        # in its outage grace stays, to be looked at again next tick).
        leases.settle([name for name in due if name not in alive and name not in waiting])
        return requeued

    def expire_agent(self, agent: Agent, busy: bool = True) -> int:
        """The decision for one agent without a lease: a graceful stop gives its jobs back
        quietly; otherwise log ``lease expired`` once and requeue its running jobs."""
        leases = self.app.extensions["leases"]
        stopped = agent.stopped_at is not None
        if not stopped and agent.last_seen is not None and agent.lease_expired_at is None:
            agent.lease_expired_at = utcnow()
            db.session.commit()
            leases.forget(agent.key_hash)  # its next renewal goes through the database
            logger.error("lease expired agent=%s region=%s last_seen=%s",
                         agent.name, agent.region, agent.last_seen.isoformat())
        if not busy:
            return 0
        # A stopped agent's jobs finished or were given back; any left go back quietly.
        return jobs.requeue_running(agent, f"agent {agent.name} stopped" if stopped
                                    else f"lease expired on agent {agent.name}")

    def _outage_grace(self, agent: Agent, now: float, last_any: float | None, resumed: float | None,
                      renewal: tuple[float, float] | None) -> bool:
        """Whether to wait before calling this agent dead: the silence may be the fleet's.

        ``renewal`` is (its last renewal, its lease TTL) from Redis; unknown after a flush,
        when the record's last_seen and the default heartbeat stand in.
        """
        renewed_at, ttl = renewal or (agent.last_seen.replace(tzinfo=UTC).timestamp() if agent.last_seen else 0.0,
                                      0.0)
        ttl = ttl if ttl > 0 else 3 * 30.0
        heartbeat = ttl / 3  # the lease TTL is three heartbeats
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
        """Running jobs past their time limit (plus grace) get another attempt (indexed on run_deadline)."""
        timed_out = 0
        for job in db.session.scalars(select(Job).where(
                Job.status == JobStatus.RUNNING, Job.run_deadline < utcnow() - TIMEOUT_GRACE)).all():
            if job.attempt < job.max_attempts:  # the last one: requeue logs "job failed permanently"
                logger.warning("job timeout, will retry job_id=%s attempt=%s agent=%s",
                               job.id, job.attempt, job.agent_name)
            jobs.requeue(job, f"job timeout after {job.time_limit}s on agent {job.agent_name}")
            timed_out += 1
        return timed_out

    def restore_handouts(self) -> int:
        """Jobs a poll handed out but nobody claimed in time go back to their queue, same attempt."""
        restored = []
        for broker in self.brokers.all():
            try:
                restored += handouts.restore_expired(broker.client)
            except Exception as exc:  # that broker is down: its handouts wait there for it
                if not _is_redis_error(exc):
                    raise
                logger.warning("broker %s unreachable, cannot restore its handouts: %s", redact(broker.url), exc)
        for handout in restored:
            logger.warning("handout expired, job back on its queue job_id=%s attempt=%s agent=%s queue=%s",
                           (decode_delivery(handout["raw"]) or ("?",))[0], handout["attempt"],
                           handout["agent"], handout["queue"])
        return len(restored)

    def repair_queues(self, full: bool = True) -> int:
        """Publish again every queued job whose message is not in Redis (flushed, lost, never sent).

        A queue is read whole only when it is suspect: its broker lost data (a flushed
        Redis lost our marker key; a restarted or failed-over one has a new run id), or
        the queue is empty while the database has a job queued on it. A full check also
        compares, per queue, the jobs queued in the database with the messages the broker
        holds, and reads the next queue in turn (for a loss hidden by a stale message).
        """
        cutoff = utcnow() - REPUBLISH_AFTER
        if full or self._queues is None:
            self._queues = self._known_queues()
        expected: dict[str, int] = {}
        if full:
            expected = {queue_for(capability, region): n for capability, region, n in db.session.execute(
                select(Job.capability, Job.region, func.count()).where(
                    Job.status == JobStatus.QUEUED, Job.queued_at < cutoff).group_by(Job.capability, Job.region)).all()}
            self._queues |= set(expected)
        turn = None
        if full and expected:
            ordered = sorted(expected)
            turn = ordered[self._next_queue % len(ordered)]
            self._next_queue += 1
        republished = 0
        for broker, queues in self.brokers.group_queues(self._queues):
            try:
                if self._lost_data(broker):
                    logger.warning("broker %s lost data (flushed, restarted or failed over): checking every queue",
                                   redact(broker.url))
                    suspects = set(queues)
                else:
                    suspects = self._suspect_queues(broker, queues, expected if full else None, cutoff)
                if turn in queues:
                    suspects.add(turn)
                if suspects:
                    republished += self._republish_missing(broker, suspects, cutoff)
            except Exception as exc:  # this broker is down: its jobs wait (in the database) for it
                if not _is_redis_error(exc):
                    raise
                self._epochs[broker.url] = "unreachable"  # when it answers again, every queue is checked
                logger.warning("broker %s unreachable, cannot repair its queues: %s", redact(broker.url), exc)
        return republished

    @staticmethod
    def _known_queues() -> set[str]:
        """Every queue a job may be on: each capability in each configured or registered region."""
        return {queue_for(c, r) for r in jobs.known_regions(include_disabled=True) for c in CAPABILITIES}

    def _lost_data(self, broker: Broker) -> bool:
        """Did this broker's Redis lose data since the last tick? (one round trip)

        A marker key disappears with FLUSHALL; the server's run id changes with a restart
        or a Sentinel failover to a replica, which may lack the last writes.
        """
        pipe = broker.client.pipeline(transaction=False)
        pipe.set(BROKER_MARKER, secrets.token_hex(8), nx=True)
        pipe.get(BROKER_MARKER)
        pipe.info("server")
        _, marker, info = pipe.execute()
        epoch = f"{info.get('run_id')}:{marker}"
        known = self._epochs.get(broker.url)
        self._epochs[broker.url] = epoch
        return known is not None and known != epoch

    @staticmethod
    def _suspect_queues(broker: Broker, queues: list[str], expected: dict[str, int] | None, cutoff) -> set[str]:
        """Queues that may miss messages: with ``expected`` (full check), those holding fewer
        messages (plus any unacked or handed-out one) than queued jobs; else the empty ones
        the database has a job queued on (one EXISTS per empty queue, in one statement)."""
        # Unacked (delivered to a Celery worker) and handed-out messages may be any queue's.
        depths, slack = broker.backlog(queues, hashes=(broker.layout.unacked_key, handouts.HANDOUTS))
        if expected is not None:
            return {queue for queue, n in expected.items() if queue in depths and depths[queue] + slack < n}
        empty = [q for q in queues if depths[q] == 0]
        if not empty:
            return set()
        checks = []
        for queue in empty:
            capability, region = parse_queue(queue)
            checks.append(select(literal(queue)).where(exists().where(
                Job.status == JobStatus.QUEUED, Job.capability == capability, Job.region == region,
                Job.queued_at < cutoff)))
        return set(db.session.scalars(union_all(*checks) if len(checks) > 1 else checks[0]).all())

    @staticmethod
    def _republish_missing(broker: Broker, queues: set[str], cutoff) -> int:
        """Read ``queues`` whole and publish again each of their queued jobs with no message."""
        present = broker.deliveries(queues)
        present |= handouts.handed_out(broker.client)  # popped by a poll, waiting for its claim
        # Delivered to a worker but never claimed: a worker that died before its claim, or a
        # delivery whose master failed over. Its message would come back only after the
        # visibility timeout (hours), so after UNACKED_GRACE it counts as missing.
        delivered = broker.unacked()
        orphaned_before = utcnow() - UNACKED_GRACE
        republished = 0
        for queue in sorted(queues):
            capability, region = parse_queue(queue)
            missing = [job_id for job_id, attempt, queued_at in db.session.execute(
                select(Job.id, Job.attempt, Job.queued_at).where(
                    Job.status == JobStatus.QUEUED, Job.capability == capability, Job.region == region,
                    Job.queued_at < cutoff))
                if (job_id, attempt) not in present
                and ((job_id, attempt) not in delivered or queued_at is None or queued_at < orphaned_before)]
            for start in range(0, len(missing), 1000):  # bounded IN lists (SQLite caps parameters)
                for job in db.session.scalars(select(Job).where(Job.id.in_(missing[start:start + 1000]),
                                                                Job.status == JobStatus.QUEUED)).all():
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
            admitted += jobs.admit_pending(tenant_id)  # a tenant since deleted admits nothing
        return admitted


def _is_redis_error(exc: Exception) -> bool:
    return isinstance(exc, (redis.RedisError, OperationalError, ConnectionError, OSError))
