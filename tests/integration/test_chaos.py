"""Outages are not crashes: an API restart, a Redis restart and a FLUSHALL mid-run lose no job
and run none twice (the agents keep their jobs through one lease TTL of grace).

Two agents run simulated scans; each fault lasts longer than the lease TTL (3s), so every
lease lapses. Executions are counted from the agents' ``job started`` lines.
"""
from __future__ import annotations

import time

import pytest

from tests.support.fleet import completions, executions

pytestmark = pytest.mark.e2e

JOBS = 20
OUTAGE = 5.0  # seconds: longer than the lease TTL (3 x 1s heartbeat)


def counts(stack, job_ids) -> dict[str, int]:
    found: dict[str, int] = {}
    for job_id in job_ids:
        status = stack.job(job_id)["status"]
        found[status] = found.get(status, 0) + 1
    return found


def _api_restart(stack, redis):
    stack.stop_api()
    time.sleep(OUTAGE)  # the outage itself: nothing to wait for
    stack.start_api()


def _redis_restart(stack, redis):
    redis.stop()
    time.sleep(OUTAGE)
    redis.start()  # empty: no persistence


def _flushall(stack, redis):
    import redis as redis_lib
    client = redis_lib.Redis.from_url(redis.url)
    client.flushall()
    client.close()


@pytest.mark.parametrize("fault", [_api_restart, _redis_restart, _flushall],
                         ids=["api-restart", "redis-restart", "flushall"])
def test_an_outage_mid_run_loses_no_job_and_runs_none_twice(own_redis_stack, own_redis, fault):
    stack = own_redis_stack
    stack.env["EXPLOOP_JOB_MAX_ATTEMPTS"] = "5"  # a requeue would show as attempt 2, not a failure
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    for name in ("agent-a", "agent-b"):
        stack.start_agent(name, EXPLOOP_SIMULATED_SCAN="1s", MAX_CONCURRENT_JOBS="2")
    stack.wait_agent_online(count=2)
    job_ids = [stack.submit(tenant) for _ in range(JOBS)]
    stack.wait_for(lambda: counts(stack, job_ids).get("completed", 0) >= 4, 60, "first jobs done")
    running = [j for j in job_ids if stack.job(j)["status"] == "running"]
    fault(stack, own_redis)
    restored = time.monotonic()
    stack.wait_for(lambda: all(stack.job(j)["status"] == "completed" for j in running), 90,
                   "jobs running at the fault completed")
    recovered = time.monotonic() - restored
    stack.wait_for(lambda: counts(stack, job_ids).get("completed") == JOBS, 180, f"all {JOBS} completed")
    started, done = executions(stack.agents), completions(stack.agents)
    twice = sorted(j for j in job_ids if started.get(j, 0) != 1)
    assert twice == [], f"executed twice (or never): {[(j, started.get(j)) for j in twice]}"
    assert all(done.get(j) == 1 for j in job_ids)
    assert all(stack.job(j)["attempt"] == 1 for j in job_ids)
    assert "lease expired agent=" not in stack.controller.output()
    print(f"\n{fault.__name__[1:]}: {len(running)} jobs running at the fault completed {recovered:.1f}s"
          f" after it ended; 0 lost, 0 executed twice")
