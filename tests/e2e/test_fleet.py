"""Fleet control with real processes: crash recovery, drain, graceful stop, Redis loss, fairness.

Agents run simulated scans (EXPLOOP_SIMULATED_SCAN: a sleep, no findings) so each
test controls how long a job runs; everything else is the real path.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.support.stack import make_git_repo

pytestmark = pytest.mark.e2e


def running_on(stack, job_id):
    job = stack.job(job_id)
    return job["agent"] if job["status"] == "running" else None


def status_counts(stack, job_ids):
    counts = {}
    for job_id in job_ids:
        status = stack.job(job_id)["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def test_kill_9_mid_job_completes_on_another_agent_once(stack, redis_client):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    # agent-a's scan outlasts the test: it is still running when agent-a is killed, however slow the host.
    first = stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="120s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    assert stack.wait_for(lambda: running_on(stack, job_id), 20, "job running") == "agent-a"
    stack.start_agent("agent-b", EXPLOOP_SIMULATED_SCAN="3s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-b")
    killed_at = time.monotonic()
    first.kill()
    job = stack.wait_job(tenant, job_id, timeout=3 + 10 + 3 + 5)
    recovered = time.monotonic() - killed_at
    assert job["status"] == "completed" and job["agent"] == "agent-b"
    assert job["attempt"] == 2
    assert recovered < 3 + 10 + 3 + 5
    assert "lease expired agent=agent-a" in stack.controller.output()
    # Exactly once: no further attempt, and agent-a shows offline.
    time.sleep(1)
    assert stack.job(job_id)["attempt"] == 2
    assert stack.admin("GET", "/admin/v1/agents/agent-a").json()["status"] == "offline"


def test_drain_lets_running_jobs_finish_and_survives_restart(stack, tmp_path):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    home_a = tmp_path / "home-a"
    home_a.mkdir()
    agent_a = stack.start_agent("agent-a", home=home_a, EXPLOOP_SIMULATED_SCAN="3s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    first_job = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, first_job) == "agent-a", 20, "job on agent-a")
    stack.start_agent("agent-b", EXPLOOP_SIMULATED_SCAN="0.5s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-b")

    drained = stack.admin("POST", "/admin/v1/agents/agent-a/drain")
    assert drained.status_code == 200 and drained.json()["status"] == "draining"
    more = [stack.submit(tenant) for _ in range(3)]
    assert stack.wait_job(tenant, first_job)["agent"] == "agent-a"  # the running job finished
    for job_id in more:
        assert stack.wait_job(tenant, job_id)["agent"] == "agent-b"
    view = stack.wait_for(lambda: (lambda v: v if v["jobs_running"] == 0 else None)(
        stack.admin("GET", "/admin/v1/agents/agent-a").json()), 10, "agent-a idle")
    assert view["status"] == "draining"

    # A restart does not undo the drain.
    assert agent_a.stop() == 0
    agent_a = stack.start_agent("agent-a", home=home_a, EXPLOOP_SIMULATED_SCAN="0.5s", MAX_CONCURRENT_JOBS="1")
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-a").json()["status"] == "draining",
                   20, "agent-a back, still draining")
    after_restart = [stack.submit(tenant) for _ in range(2)]
    for job_id in after_restart:
        assert stack.wait_job(tenant, job_id)["agent"] == "agent-b"

    # Uncordon: agent-a takes jobs again (agent-b stopped so only agent-a can).
    stack.agents[1].stop()
    assert stack.admin("POST", "/admin/v1/agents/agent-a/uncordon").json()["status"] == "online"
    last = stack.submit(tenant)
    assert stack.wait_job(tenant, last, timeout=30)["agent"] == "agent-a"


def test_sigterm_finishes_the_running_job_then_exits_0(stack, redis_client):
    stack.start_api()
    tenant = stack.tenant()
    agent = stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="5s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, job_id), 20, "job running")
    agent.signal(signal.SIGTERM)
    time.sleep(3.5)  # longer than the lease TTL (3 x 1s): renewals go on during shutdown
    assert redis_client.exists("exploop:lease:agent-a")
    assert agent.wait(timeout=30) == 0
    job = stack.job(job_id)
    assert job["status"] == "completed" and job["agent"] == "agent-a" and job["attempt"] == 1
    assert not redis_client.exists("exploop:lease:agent-a")  # released on the way out


def test_always_crashing_scanner_fails_every_job_permanently(stack, tmp_path):
    stack.env["EXPLOOP_JOB_MAX_ATTEMPTS"] = "2"
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    # A broken agent host: no git on PATH, so every checkout crashes.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("python3") or "/usr/bin/python3", bin_dir / "python3")
    stack.start_agent("agent-broken", PATH=str(bin_dir), MAX_CONCURRENT_JOBS="4")
    stack.wait_agent_online("agent-broken")
    # A local repository: the destination policy (which refuses a host it cannot resolve before
    # any git runs) has nothing to say, so each attempt crashes in the checkout itself.
    repo_url = make_git_repo(tmp_path / "repo", {"app.py": "x = 1\n"})
    job_ids = [stack.submit(tenant, repo_url=repo_url) for _ in range(50)]
    stack.wait_for(lambda: status_counts(stack, job_ids).get("failed") == 50, 120, "all failed")
    for job_id in job_ids[:5]:
        job = stack.job(job_id)
        assert job["attempt"] == 2 and "attempt 2 of 2" in job["error"]
    assert Path(stack.api.log_path).read_text().count("job failed permanently") == 50


def test_a_burst_from_one_tenant_does_not_starve_another(stack):
    stack.env["EXPLOOP_PLANS"] = '{"team": {"max_concurrent": 4, "max_queue": 200}}'
    stack.env["EXPLOOP_DEFAULT_PLAN"] = "team"
    stack.start_api()
    stack.start_controller()
    tenant_a, tenant_b = stack.tenant("tenant-a"), stack.tenant("tenant-b")
    # 1 s scans: A's backlog takes 25 s or more, longer than submitting it, however slow the host.
    stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="1s", MAX_CONCURRENT_JOBS="4")
    stack.wait_agent_online("agent-a")
    a_jobs = [stack.submit(tenant_a) for _ in range(100)]
    b_jobs = [stack.submit(tenant_b) for _ in range(5)]
    for job_id in b_jobs:
        stack.wait_job(tenant_b, job_id, timeout=60)
    a_done = status_counts(stack, a_jobs).get("completed", 0)
    assert a_done < 100, "tenant B waited for tenant A's whole backlog"
    stack.wait_for(lambda: status_counts(stack, a_jobs).get("completed") == 100, 120, "A's backlog")
