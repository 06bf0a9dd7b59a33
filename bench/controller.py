"""Benchmark the controller's tick at fleet scale: does its cost follow change, not size?

Starts a private redis-server, migrates a fresh database (SQLite, or
``EXPLOOP_BENCH_DATABASE_URL``, e.g. a PostgreSQL database of its own: it is emptied),
and for each case inserts N agents (each with a lease, its deadline in the index, and
half of them running one job) and J queued jobs whose messages sit in their kombu
queues (12 queues: 3 capabilities x 4 regions). It then times ``Controller.tick()``:

* idle: nothing changes between ticks;
* 1% changing: before each tick, 1% of the agents renew their leases, 1% of the
  queued jobs are taken off their queue and claimed, and as many new jobs are queued
  with their messages (what a busy fleet does between two ticks).
  The work a change causes (a lease expiring: log, requeue) is timed separately:
  per expired agent, since it is proportional to the change, not to the fleet;
* the full check (every ``full_check_every`` ticks: every agent, one queue read whole).

It prints p50/p95 per case and the growth from the small to the large case; the target
is <= 100 ms p50 at 10,000 agents + 100,000 queued jobs and < 3x growth. Asserts nothing.

    .venv/bin/python bench/controller.py [--ticks 30] [--cases 1000x10000,10000x100000]
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, update

from exploop.api.app import create_app, init_db
from exploop.broker import decode_delivery
from exploop.core.controller import Controller
from exploop.core.extensions import db
from exploop.core.leases import DEADLINES, LeaseStore
from exploop.core.models import Agent, Job, Tenant, utcnow
from exploop.core.security import hash_token
from exploop.routing import queue_for
from exploop.run.children import free_port, start_redis

sys.path.insert(0, str(Path(__file__).parent))
from get_agents import REGIONS, _empty_database, percentile  # noqa: E402

CAPABILITIES = ("sast", "sca", "secrets")


def message(job_id: str, attempt: int, capability: str, region: str) -> str:
    """A scan message the way kombu's Redis transport stores what ``jobs.publish`` sends."""
    body = json.dumps([[], {"job_id": job_id, "attempt": attempt, "capability": capability, "region": region},
                       {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    queue = queue_for(capability, region)
    return json.dumps({"body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
                       "content-type": "application/json",
                       "headers": {"lang": "py", "task": "exploop.run_scan", "id": uuid.uuid4().hex},
                       "properties": {"correlation_id": uuid.uuid4().hex, "body_encoding": "base64",
                                      "delivery_tag": uuid.uuid4().hex, "priority": 0,
                                      "delivery_info": {"exchange": "", "routing_key": queue}}})


class Fleet:
    """The rows and Redis keys of one case, and the changes a busy fleet makes between ticks."""

    def __init__(self, app, agents: int, queued: int, seed: int = 7):
        self.app, self.rng = app, random.Random(seed)
        self.leases: LeaseStore = app.extensions["leases"]
        self.redis = app.extensions["broker"].client
        self.layout = app.extensions["broker"].layout
        self.names = [f"agent-{REGIONS[i % 4]}-{i:05d}" for i in range(agents)]
        self.queued_ids: list[tuple[str, str, str]] = []
        self.populate(agents, queued)

    def populate(self, agents: int, queued: int) -> None:
        now = utcnow()
        old = now - timedelta(minutes=5)
        with self.app.app_context():
            tenant = Tenant(name="big-import", key_hash=hash_token("bench-tenant"), plan="enterprise")
            db.session.add(tenant)
            db.session.commit()
            rows = [{"name": name, "region": REGIONS[i % 4], "capabilities": "sast,sca,secrets", "max_jobs": 5,
                     "key_hash": hash_token(f"bench-{i}"), "desired_state": "active", "disabled": False,
                     "last_seen": now, "created_at": now} for i, name in enumerate(self.names)]
            for start in range(0, len(rows), 5000):
                db.session.execute(insert(Agent), rows[start:start + 5000])
            db.session.commit()
            ids = dict(db.session.execute(db.select(Agent.name, Agent.id)).all())
            jobs = []
            for i, name in enumerate(self.names[::2]):  # half the agents run one job
                jobs.append(self._job(tenant.id, "running", old, capability=CAPABILITIES[i % 3],
                                      region=name.split("-", 1)[1].rsplit("-", 1)[0], agent_id=ids[name],
                                      agent_name=name, started_at=old, run_deadline=old + timedelta(hours=1)))
            for i in range(queued):
                job = self._job(tenant.id, "queued", old, capability=CAPABILITIES[i % 3], region=REGIONS[(i // 3) % 4])
                jobs.append(job)
                self.queued_ids.append((job["id"], job["capability"], job["region"]))
            for start in range(0, len(jobs), 5000):
                db.session.execute(insert(Job), jobs[start:start + 5000])
            db.session.commit()
            db.session.remove()
        pipe = self.redis.pipeline(transaction=False)
        for n, (job_id, capability, region) in enumerate(self.queued_ids, 1):
            pipe.lpush(self.layout.lists(queue_for(capability, region))[0], message(job_id, 1, capability, region))
            if n % 5000 == 0:
                pipe.execute()
        pipe.execute()
        self.renew(self.names)

    @staticmethod
    def _job(tenant_id: int, status: str, at, **fields) -> dict:
        return {"id": uuid.uuid4().hex, "tenant_id": tenant_id, "repo_url": "https://example.com/r.git",
                "ref": "HEAD", "status": status, "priority": "normal", "admission_key": at, "attempt": 1,
                "max_attempts": 3, "time_limit": 1800, "progress": 0, "created_at": at, "queued_at": at, **fields}

    def renew(self, names: list[str]) -> None:
        body = {"status": "active", "jobs_running": 1, "max_jobs": 5, "heartbeat_interval": 30}
        for name in names:
            self.leases.renew(name, body, 3600)  # no lease runs out during the bench unless expire() says

    def change(self, share: float) -> None:
        """1% of agents renew; 1% of queued jobs are consumed and claimed, as many new ones queued."""
        count = max(1, int(len(self.names) * share))
        self.renew(self.rng.sample(self.names, count))
        jobs = max(1, int(len(self.queued_ids) * share))
        pipe = self.redis.pipeline(transaction=False)
        for _ in range(jobs):  # agents' BRPOPs take the oldest message of some queue
            pipe.rpop(self.layout.lists(queue_for(self.rng.choice(CAPABILITIES), self.rng.choice(REGIONS)))[0])
        taken_ids = {decode_delivery(raw)[0] for raw in pipe.execute() if raw}
        taken = [entry for entry in self.queued_ids if entry[0] in taken_ids]
        self.queued_ids = [entry for entry in self.queued_ids if entry[0] not in taken_ids]
        now = utcnow()
        with self.app.app_context():
            db.session.execute(update(Job).where(Job.id.in_([t[0] for t in taken]))
                               .values(status="running", started_at=now, run_deadline=now + timedelta(hours=1)))
            tenant_id = db.session.scalar(db.select(Tenant.id))
            fresh = [self._job(tenant_id, "queued", now, capability=c, region=r) for _i, c, r in taken]
            db.session.execute(insert(Job), fresh)
            db.session.commit()
            db.session.remove()
        pipe = self.redis.pipeline(transaction=False)
        for job in fresh:
            pipe.lpush(self.layout.lists(queue_for(job["capability"], job["region"]))[0],
                       message(job["id"], 1, job["capability"], job["region"]))
            self.queued_ids.append((job["id"], job["capability"], job["region"]))
        pipe.execute()

    def expire(self, count: int) -> None:
        """``count`` agents stop renewing: their leases run out now."""
        names = self.rng.sample(self.names[::2], count)  # agents that run a job
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.delete(LeaseStore.key(name))
            pipe.zadd(DEADLINES, {name: 0})
        pipe.execute()


def timed(controller: Controller, ticks: int, before=None, full: bool = False) -> tuple[list[float], dict]:
    values, last = [], {}
    for _ in range(ticks):
        if before:
            before()
        started = time.perf_counter()
        last = controller.tick(full=full)
        values.append((time.perf_counter() - started) * 1000)
    return values, last


def run_case(database_url: str, redis_url: str, agents: int, queued: int, ticks: int) -> dict:
    _empty_database(database_url)
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "REDIS_URL": redis_url,
                      "REGIONS": ",".join(REGIONS), "PLANS": {"enterprise": {"max_concurrent": 10 ** 9,
                                                                             "max_queue": 10 ** 9}}})
    init_db(app)
    app.extensions["redis"].flushall()
    started = time.perf_counter()
    fleet = Fleet(app, agents, queued)
    setup = time.perf_counter() - started
    controller = Controller(app, interval=5.0)
    controller.tick(full=True)  # warm: connections, caches, first full check
    idle, _ = timed(controller, ticks)
    changing, last = timed(controller, ticks, before=lambda: fleet.change(0.01))
    full, _ = timed(controller, 3, full=True)
    expired = max(1, agents // 100)
    fleet.expire(expired)
    started = time.perf_counter()
    result = controller.tick(full=False)
    expiry = (time.perf_counter() - started) * 1000
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    return {"agents": agents, "queued": queued, "setup": setup, "idle": idle, "changing": changing, "full": full,
            "expiry_ms": expiry, "expired": expired, "requeued": result["expired"],
            "republished_while_changing": last.get("republished", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--cases", default="1000x10000,10000x100000",
                        help="agents x queued jobs, comma separated; the first is the baseline")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the expiry case logs one line per agent and job
    cases = [tuple(int(n) for n in case.split("x")) for case in args.cases.split(",")]
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp:
        redis_port = free_port()
        redis_child = start_redis(redis_port, Path(tmp) / "redis.log")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        database_url = os.environ.get("EXPLOOP_BENCH_DATABASE_URL") or f"sqlite:///{Path(tmp) / 'bench.db'}"
        print(f"controller tick, {database_url.split(':')[0]} + redis, {args.ticks} ticks per measurement,"
              f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        results = []
        try:
            for agents, queued in cases:
                if database_url.startswith("sqlite"):
                    Path(database_url[len("sqlite:///"):]).unlink(missing_ok=True)
                r = run_case(database_url, redis_url, agents, queued, args.ticks)
                results.append(r)
                print(f"\n{agents:>6} agents x {queued:>6} queued jobs  (setup {r['setup']:.0f}s,"
                      f" load average {os.getloadavg()[0]:.1f})")
                for label in ("idle", "changing", "full"):
                    values = r[label]
                    name = {"idle": "idle", "changing": "1% changing", "full": "full check"}[label]
                    print(f"  {name:14s} p50 {statistics.median(values):7.1f} ms   p95 {percentile(values, 0.95):7.1f} ms"
                          f"   max {max(values):7.1f} ms")
                print(f"  {r['expired']} leases expiring in one tick: {r['expiry_ms']:.1f} ms"
                      f" ({r['requeued']} jobs requeued, {r['expiry_ms'] / r['expired']:.2f} ms per agent)")
        finally:
            redis_child.stop()
        if len(results) > 1:
            small, large = results[0], results[-1]
            print("\ngrowth from the first to the last case (p50):")
            for label in ("idle", "changing", "full"):
                a, b = statistics.median(small[label]), statistics.median(large[label])
                print(f"  {label:10s} {a:7.1f} ms -> {b:7.1f} ms   x{b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
