"""The controller's cheap paths (real Redis, real database, the Controller object itself):
lease expiry from the deadline index, queue repair from suspect queues only, time-outs
and admission by indexed queries; and a page's queue positions in a few statements."""
from __future__ import annotations

import random
import time
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, text

from exploop.core import jobs
from exploop.core.controller import Controller
from exploop.core.extensions import db
from exploop.core.leases import AGENT_RENEWALS_KEY, DEADLINES, RESUMED_KEY
from exploop.core.models import Agent, Job, Tenant, utcnow
from exploop.core.security import hash_token

BODY = {"status": "active", "jobs_running": 0, "max_jobs": 2, "heartbeat_interval": 1}


def add_agent(name: str, region: str = "us-east-1") -> Agent:
    agent = Agent(name=name, region=region, capabilities="sast,sca,secrets", max_jobs=2,
                  key_hash=hash_token(name), last_seen=utcnow())
    db.session.add(agent)
    db.session.commit()
    return agent


def add_job(tenant: Tenant, status: str, capability: str = "sast", region: str = "us-east-1",
            age: float = 60, **fields) -> Job:
    at = utcnow() - timedelta(seconds=age)
    job = Job(tenant_id=tenant.id, capability=capability, region=region, repo_url="https://example.com/r.git",
              status=status, time_limit=600, created_at=at, admission_key=fields.pop("admission_key", at),
              queued_at=at if status != "pending" else None, **fields)
    db.session.add(job)
    db.session.commit()
    return job


@pytest.fixture
def ctx(app):
    with app.app_context():
        tenant = Tenant(name="acme", key_hash=hash_token("acme"), plan="enterprise")
        db.session.add(tenant)
        db.session.commit()
        yield app, tenant
        db.session.remove()


def agents_loaded(app):
    """Count the agent rows each statement loads (the tick must not read the fleet)."""
    loaded = []

    @event.listens_for(db.engine, "after_cursor_execute")
    def _seen(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "FROM agents" in statement:
            loaded.append(statement)
    return loaded, lambda: event.remove(db.engine, "after_cursor_execute", _seen)


def test_lease_expiry_reads_only_agents_whose_deadline_passed(ctx, redis_client):
    app, tenant = ctx
    leases = app.extensions["leases"]
    for n in range(20):
        add_agent(f"agent-{n}")
        leases.renew(f"agent-{n}", BODY, 60)
    gone = add_agent("agent-gone")
    leases.renew("agent-gone", BODY, 60)
    job = add_job(tenant, "running", agent_id=gone.id, agent_name=gone.name, started_at=utcnow())
    assert redis_client.zcard(DEADLINES) == 21
    controller = Controller(app, interval=1)
    assert controller.tick(full=True)["expired"] == 0

    # Its lease runs out (it crashed 100 s ago while the fleet kept renewing: no outage
    # grace): only this agent is a candidate.
    redis_client.delete("exploop:lease:agent-gone")
    redis_client.zadd(DEADLINES, {"agent-gone": 0})
    redis_client.hset(AGENT_RENEWALS_KEY, "agent-gone", time.time() - 100)
    redis_client.set(RESUMED_KEY, time.time() - 1000)
    leases.renew("agent-0", BODY, 60)
    candidates, due = controller.lease_candidates(full=False)
    assert [a.name for a in candidates] == ["agent-gone"] and due == ["agent-gone"]
    assert controller.expire_leases(full=False) == 1
    db.session.expire_all()
    assert db.session.get(Job, job.id).status == "queued" and db.session.get(Job, job.id).attempt == 2
    assert db.session.get(Agent, gone.id).lease_expired_at is not None
    # Handled: out of the index; the other agents' deadlines are untouched.
    assert redis_client.zscore(DEADLINES, "agent-gone") is None
    assert redis_client.zcard(DEADLINES) == 20
    assert controller.lease_candidates(full=False) == ([], [])

    # An idle tick reads no agent row at all.
    loaded, stop = agents_loaded(app)
    try:
        controller.tick(full=False)
    finally:
        stop()
    assert [s for s in loaded if "agents.key_hash" in s] == []


def test_a_renewal_moves_the_deadline_and_a_release_makes_the_agent_due(ctx, redis_client):
    app, _tenant = ctx
    leases = app.extensions["leases"]
    add_agent("agent-a")
    leases.renew("agent-a", BODY, 30)
    first = redis_client.zscore(DEADLINES, "agent-a")
    now = float(redis_client.time()[0])
    assert now + 29 <= first <= now + 31
    leases.release("agent-a")
    assert leases.due() == ["agent-a"]
    # Renewed before the controller handled it: settle keeps the new deadline.
    leases.renew("agent-a", BODY, 30)
    assert leases.settle(["agent-a"]) == 0 and redis_client.zscore(DEADLINES, "agent-a") >= now + 29


def test_full_check_finds_agents_missing_from_a_flushed_index(ctx, redis_client, caplog):
    app, tenant = ctx
    leases = app.extensions["leases"]
    agent = add_agent("agent-a")
    leases.renew("agent-a", BODY, 60)
    job = add_job(tenant, "running", agent_id=agent.id, agent_name=agent.name, started_at=utcnow())
    controller = Controller(app, interval=1, full_check_every=3)
    controller.tick()  # the first tick is a full check
    redis_client.flushall()  # lease and index gone
    assert controller.tick()["expired"] == 0  # cheap ticks cannot see it...
    assert controller.tick()["expired"] == 0
    assert controller.tick()["expired"] == 0  # ...the full check does, but Redis lost its keys:
    assert "Redis lost its keys" in caplog.text  # the agent gets one lease TTL to renew
    controller.keys_lost_since = time.time() - 3600  # an hour later, no renewal came
    controller.ticks = 0  # and the next tick is a full check again
    assert controller.tick()["expired"] == 1
    db.session.expire_all()
    assert db.session.get(Job, job.id).attempt == 2


def queue_key(app, queue: str) -> str:
    return app.extensions["broker"].layout.lists(queue)[0]


def test_repair_reads_only_suspect_queues(ctx, redis_client):
    app, tenant = ctx
    controller = Controller(app, interval=1, full_check_every=1000)
    queued = [add_job(tenant, "queued", capability=cap) for cap in ("sast", "sca") for _ in range(3)]
    for job in queued:
        jobs.publish(job)
    reads = []
    real = app.extensions["broker"].deliveries
    app.extensions["broker"].deliveries = lambda queues, **kw: reads.append(sorted(queues)) or real(queues, **kw)
    try:
        assert controller.tick()["republished"] == 0  # full check: counts match
        reads.clear()
        assert controller.tick()["republished"] == 0
        assert reads == []  # nothing suspect: no queue read

        redis_client.delete(queue_key(app, "sca.us-east-1"))  # a queue lost
        assert controller.tick()["republished"] == 3
        assert reads == [["sca.us-east-1"]]
        reads.clear()
        assert controller.tick()["republished"] == 0 and reads == []

        redis_client.flushall()  # the marker goes with everything else: every queue is checked
        assert controller.tick()["republished"] == 6
        assert redis_client.llen(queue_key(app, "sast.us-east-1")) == 3
    finally:
        app.extensions["broker"].deliveries = real


def test_full_check_finds_a_loss_hidden_by_a_stale_message(ctx, redis_client):
    app, tenant = ctx
    controller = Controller(app, interval=1, full_check_every=2)
    kept, lost = add_job(tenant, "queued"), add_job(tenant, "queued")
    jobs.publish(kept)
    stale = add_job(tenant, "queued")
    jobs.publish(stale)
    stale.status = "cancelled"  # its message stays until an agent drops it
    db.session.commit()
    assert controller.tick()["republished"] == 1  # full: 2 messages for 2 queued jobs, but the turn reads it
    assert redis_client.llen(queue_key(app, "sast.us-east-1")) == 3
    assert controller.tick()["republished"] == 0
    jobs.requeue(lost, "test")  # published again as attempt 2: nothing missing
    assert controller.tick()["republished"] == 0


def test_time_outs_and_admission_by_index(ctx):
    app, tenant = ctx
    late = add_job(tenant, "running", started_at=utcnow() - timedelta(seconds=700),
                   run_deadline=utcnow() - timedelta(seconds=100))
    on_time = add_job(tenant, "running", started_at=utcnow() - timedelta(seconds=700),
                      run_deadline=utcnow() - timedelta(seconds=30))  # within the 60 s grace
    controller = Controller(app, interval=1)
    assert controller.time_out_jobs() == 1
    db.session.expire_all()
    assert db.session.get(Job, late.id).attempt == 2 and db.session.get(Job, late.id).run_deadline is None
    assert db.session.get(Job, on_time.id).status == "running"

    # A claim sets the deadline the index finds.
    agent = add_agent("agent-a")
    job, _token = jobs.claim(agent, late.id, 2)
    assert job.run_deadline == job.started_at + timedelta(seconds=job.time_limit)

    # Plans on a table of some size, with statistics (the planner ignores indexes of tiny tables).
    import uuid

    from sqlalchemy import insert
    at = utcnow() - timedelta(days=1)
    db.session.execute(insert(Job), [
        {"id": uuid.uuid4().hex, "tenant_id": tenant.id, "capability": "sast", "region": "us-east-1",
         "repo_url": "https://example.com/r.git", "ref": "HEAD", "status": "completed", "priority": "normal",
         "admission_key": at, "attempt": 1, "max_attempts": 3, "time_limit": 600, "progress": 0,
         "created_at": at, "queued_at": at} for _ in range(3000)])
    db.session.commit()
    db.session.execute(text("ANALYZE"))
    db.session.commit()
    plans = {"sqlite": "EXPLAIN QUERY PLAN ", "postgresql": "EXPLAIN "}
    prefix = plans[db.engine.dialect.name]
    # An index on status leads every plan (which one is the planner's choice for so few rows).
    for statement, indexes in (
            ("SELECT id FROM jobs WHERE status = 'running' AND run_deadline < '2030-01-01'",
             ("ix_jobs_status_deadline",)),
            ("SELECT capability, region, count(*) FROM jobs WHERE status = 'queued' AND queued_at < '2030-01-01'"
             " GROUP BY capability, region", ("ix_jobs_status_queue", "ix_jobs_status ", "ix_jobs_status_created")),
            ("SELECT tenant_id FROM jobs WHERE status = 'pending' GROUP BY tenant_id ORDER BY min(created_at)",
             ("ix_jobs_status_tenant", "ix_jobs_status ", "ix_jobs_status_created"))):
        plan = " ".join(str(row[-1]) for row in db.session.execute(text(prefix + statement))) + " "
        assert any(index in plan for index in indexes), (statement, plan)


def test_page_queue_positions_match_one_count_per_job(ctx):
    app, tenant = ctx
    other = Tenant(name="other", key_hash=hash_token("other"), plan="enterprise")
    db.session.add(other)
    db.session.commit()
    rng = random.Random(3)
    page = []
    for n in range(60):
        owner = tenant if n % 3 else other
        status = rng.choice(["queued", "queued", "pending", "running", "completed"])
        page.append(add_job(owner, status, capability=rng.choice(["sast", "sca"]),
                            region=rng.choice(["us-east-1", "eu-west-1"]), age=rng.randint(1, 5) * 10,
                            admission_key=utcnow() - timedelta(seconds=rng.randint(1, 8) * 10)))

    def one_by_one(job: Job):
        count = lambda *where: db.session.scalar(select(func.count()).select_from(Job).where(*where))  # noqa: E731
        if job.status == "queued":
            return count(Job.status == "queued", Job.capability == job.capability, Job.region == job.region,
                         Job.queued_at < job.queued_at) + 1
        if job.status == "pending":
            return (count(Job.status == "queued", Job.capability == job.capability, Job.region == job.region)
                    + count(Job.tenant_id == job.tenant_id, Job.status == "pending",
                            Job.admission_key < job.admission_key) + 1)
        return None

    statements = []

    @event.listens_for(db.engine, "after_cursor_execute")
    def _seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)
    try:
        positions = jobs.queue_positions(page)
    finally:
        event.remove(db.engine, "after_cursor_execute", _seen)
    assert len(statements) <= 4  # not one per job: a grouped count, a range read, two for pending
    assert positions == {job.id: one_by_one(job) for job in page}
    assert any(p is not None and p > 1 for p in positions.values())


def test_a_delivery_never_claimed_is_published_again_after_the_grace(ctx, redis_client):
    """A worker that died between delivery and claim (or a master that failed over under it)
    leaves the message in the unacked hash, which kombu restores only after hours."""
    import json

    app, tenant = ctx
    controller = Controller(app, interval=1, full_check_every=1000)
    layout = app.extensions["broker"].layout
    fresh, orphan = add_job(tenant, "queued", age=10), add_job(tenant, "queued", age=120)
    for job in (fresh, orphan):
        jobs.publish(job)
    controller.tick()
    queue = queue_key(app, "sast.us-east-1")
    for n in range(2):  # both delivered to a worker: out of the queue, into the unacked hash
        raw = redis_client.rpop(queue)
        redis_client.hset(layout.unacked_key, f"tag-{n}", json.dumps([json.loads(raw), "", "sast.us-east-1"]))
    assert redis_client.llen(queue) == 0
    assert controller.tick()["republished"] == 1  # the one delivered over a minute ago
    assert redis_client.llen(queue) == 1
    from exploop.broker import decode_delivery
    assert decode_delivery(redis_client.lindex(queue, 0)) == (orphan.id, 1)
