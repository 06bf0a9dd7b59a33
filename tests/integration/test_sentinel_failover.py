"""Redis Sentinel end to end with real processes: one master, one replica, three sentinels,
the API, the controller and two Celery agents, all configured with a sentinel:// URL.
A stream of jobs runs while the master is killed with SIGKILL: every job completes
exactly once, the fleet comes back online and drain state survives the failover."""
from __future__ import annotations

import re
import time
import uuid

import pytest
import requests

from exploop.run.children import SentinelGroup

pytestmark = pytest.mark.e2e


@pytest.fixture
def sentinel_group(tmp_path):
    group = SentinelGroup(tmp_path / "sentinel")
    (tmp_path / "sentinel").mkdir()
    group.start()
    yield group
    group.stop()


def submit(stack, tenant: str, key: str) -> str:
    """Submit with an Idempotency-Key, retrying while Redis fails over (503): one job per key."""
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = requests.post(f"{stack.url}/api/v1/jobs", json={
                "repo_url": "https://git.example.invalid/acme/app.git", "capability": "secrets",
                "region": "us-east-1"}, headers={"Authorization": f"Bearer {tenant}", "Idempotency-Key": key},
                timeout=30)
            if reply.status_code in (200, 201):
                return reply.json()["id"]
            assert reply.status_code == 503, reply.text
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "submission kept failing"
        time.sleep(0.2)


def statuses(stack, job_ids) -> dict[str, str]:
    return {job_id: stack.job(job_id)["status"] for job_id in job_ids}


@pytest.fixture
def redis_url(sentinel_group):
    """Every process of the stack reaches Redis through the sentinels."""
    return sentinel_group.url


def completions(stack) -> dict[str, int]:
    """How many times the agents report each job completed (from their logs)."""
    counts: dict[str, int] = {}
    for agent in stack.agents:
        for job_id in re.findall(r"job completed job_id=(\w+)", agent.output()):
            counts[job_id] = counts.get(job_id, 0) + 1
    return counts


def test_master_killed_mid_stream_every_job_completes_once(stack, sentinel_group):
    stack.env["EXPLOOP_JOB_MAX_ATTEMPTS"] = "10"  # lost leases may requeue; this is about losing nothing
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    for name in ("agent-a", "agent-b"):
        stack.start_agent(name, EXPLOOP_SIMULATED_SCAN="0.3s", MAX_CONCURRENT_JOBS="2")
    stack.wait_agent_online(count=2)
    config = requests.get(stack.url + "/platform/config", headers={
        "Authorization": "Bearer " + stack.admin("POST", "/admin/v1/agents", json={
            "name": "probe", "region": "us-east-1", "capabilities": ["secrets"], "max_jobs": 1}).json()["api_key"]},
        timeout=10).json()
    assert config["broker_url"] == sentinel_group.url
    assert config["broker_transport_options"]["master_name"] == "exploop"

    job_ids = [submit(stack, tenant, uuid.uuid4().hex) for _ in range(20)]
    stack.wait_for(lambda: list(statuses(stack, job_ids).values()).count("completed") >= 5, 60, "first jobs")
    assert stack.admin("POST", "/admin/v1/agents/agent-b/drain").status_code == 200
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-b").json()["status"] == "draining",
                   20, "agent-b draining")

    old_master = sentinel_group.kill_master()
    # The stream goes on through the failover (submissions retried with their Idempotency-Key).
    job_ids += [submit(stack, tenant, uuid.uuid4().hex) for _ in range(20)]
    stack.wait_for(lambda: sentinel_group.master_port() != old_master, 30, "the sentinels to promote the replica")
    stack.wait_for(lambda: set(statuses(stack, job_ids).values()) == {"completed"}, 180,
                   "every job completed after the failover")

    # Exactly once: one completion per job, none for anything else.
    counts = completions(stack)
    assert {job_id: counts.get(job_id, 0) for job_id in job_ids} == {job_id: 1 for job_id in job_ids}
    # The fleet is back online on the new master, and agent-b is still draining.
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-a").json()["status"] == "online", 30,
                   "agent-a online")
    assert stack.admin("GET", "/admin/v1/agents/agent-b").json()["status"] == "draining"
    assert stack.admin("GET", "/admin/v1/cluster-info").json()["redis"] == "ok"

    # Uncordoned, the fleet keeps taking jobs from the new master.
    assert stack.admin("POST", "/admin/v1/agents/agent-b/uncordon").status_code == 200
    more = [submit(stack, tenant, uuid.uuid4().hex) for _ in range(8)]
    stack.wait_for(lambda: set(statuses(stack, more).values()) == {"completed"}, 60, "jobs after uncordon")
    assert {stack.job(j)["attempt"] for j in more} == {1}


def test_stall_watch_restarts_a_consumer_the_failover_left_on_the_old_master(sentinel_group):
    """The agent's StallWatch asks the sentinels which master they name: once it is not the one
    named when the consumer (re)started, the consumer is restarted at once (a connection error in
    its event loop), not after the stall strikes. Real sentinels; the consumer is the step's view
    of it (its app's settings, its timer and the agent runtime)."""
    from types import SimpleNamespace

    import redis

    from exploop.vocabulary import DesiredState
    from workers.bootsteps import StallWatchStep

    timers = []
    app = SimpleNamespace(
        conf=SimpleNamespace(broker_url=sentinel_group.url,
                             broker_transport_options={"master_name": sentinel_group.master_name}),
        exploop_runtime=SimpleNamespace(desired_state=DesiredState.ACTIVE, max_jobs=2, queues=["secrets.us-east-1"]))
    consumer = SimpleNamespace(app=app, timer=SimpleNamespace(
        call_repeatedly=lambda interval, fn, args, priority: timers.append((interval, fn, args)) or object()))
    step = StallWatchStep(consumer)
    step.start(consumer)
    assert timers and step.master is not None and step.master[1] == sentinel_group.master_port()
    step.check(consumer)  # same master, nothing waiting: no restart

    old = sentinel_group.master_port()
    sentinel_group.kill_master()
    deadline = time.monotonic() + 60
    # Until the sentinel redis-py asks first names the new master (the sentinels learn the
    # promotion one by one; until then a check sees no move and restarts nothing).
    while True:
        current = step.current_master()
        if current is not None and current[1] != old:
            break
        assert time.monotonic() < deadline, "the sentinels promoted no replica"
        time.sleep(0.1)
    with pytest.raises(redis.exceptions.ConnectionError, match="master moved"):
        step.check(consumer)
    step.check(consumer)  # the step now knows the new master: no second restart
    step.start(consumer)  # the restarted consumer's step starts on the new master
    assert step.master is not None and step.master[1] == sentinel_group.master_port()
