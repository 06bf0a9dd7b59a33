"""Recovery with real processes: a fast restart and a dead pool child requeue at once, an agent
cut off from the API fences itself, and scanners die with their agent.

Agents run simulated scans (EXPLOOP_SIMULATED_SCAN) unless a test needs a real subprocess.
Executions are counted from the agents' ``job started`` lines (one per successful claim).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.fleet import alive, children_of, completions, executions, signal_all
from tests.support.proxy import TcpProxy
from tests.support.stack import make_git_repo

pytestmark = pytest.mark.e2e


def running_on(stack, job_id):
    job = stack.job(job_id)
    return job["agent"] if job["status"] == "running" else None


def api_log(stack) -> str:
    return Path(stack.api.log_path).read_text()


def test_fast_restart_requeues_the_previous_incarnations_jobs_at_once(stack, tmp_path):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    home = tmp_path / "home-a"
    home.mkdir()
    # A long heartbeat: the old lease (TTL 15s) is still there when the agent comes back, as
    # under Docker's restart policy; only the incarnation tells the restart apart.
    env = {"EXPLOOP_SIMULATED_SCAN": "3s", "MAX_CONCURRENT_JOBS": "2", "HEARTBEAT_INTERVAL": "5s"}
    first = stack.start_agent("agent-a", home=home, **env)
    stack.wait_agent_online("agent-a")
    job_ids = [stack.submit(tenant) for _ in range(2)]
    stack.wait_for(lambda: all(running_on(stack, j) == "agent-a" for j in job_ids), 30, "both jobs running")
    first.kill()
    killed_at = time.monotonic()
    second = stack.start_agent("agent-a", home=home, **env)
    stack.wait_for(lambda: all(stack.job(j)["attempt"] == 2 for j in job_ids), 60, "jobs requeued")
    requeued = time.monotonic() - killed_at
    for job_id in job_ids:
        job = stack.wait_job(tenant, job_id, timeout=60)
        assert job["status"] == "completed" and job["attempt"] == 2 and job["agent"] == "agent-a"
        assert f"job requeued job_id={job_id} attempt=2 reason=agent agent-a restarted" in api_log(stack)
    assert "lease expired" not in stack.controller.output()
    started = executions([first, second])
    assert all(started[j] == 2 for j in job_ids)  # the killed attempt and the one that finished
    assert all(completions([first, second])[j] == 1 for j in job_ids)
    print(f"\nfast restart: jobs requeued {requeued:.1f}s after kill -9 (lease TTL 15s, heartbeat 5s)")


def test_a_pool_child_killed_mid_job_requeues_it_at_once(stack):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    agent = stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="5s", MAX_CONCURRENT_JOBS="2",
                              HEARTBEAT_INTERVAL="5s")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, job_id) == "agent-a", 30, "job running")
    pool = children_of(agent.pid)
    assert pool, "no pool children"
    signal_all(pool, signal.SIGKILL)
    killed_at = time.monotonic()
    stack.wait_for(lambda: stack.job(job_id)["attempt"] == 2, 30, "job requeued")
    requeued = time.monotonic() - killed_at
    job = stack.wait_job(tenant, job_id, timeout=60)
    assert job["status"] == "completed" and job["attempt"] == 2
    assert f"job requeued job_id={job_id} attempt=2 reason=agent agent-a lost the job" in api_log(stack)
    assert "job lost: its worker process died" in agent.output()
    assert executions([agent])[job_id] == 2 and completions([agent])[job_id] == 1
    assert agent.alive()
    print(f"\npool child kill -9: job requeued {requeued:.1f}s after the kill (heartbeat 5s)")


def test_an_agent_cut_off_from_the_api_fences_itself_until_it_renews(stack):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    proxy = TcpProxy(stack.port)
    try:
        # agent-a reaches the API only through the proxy; Redis directly, all along.
        cut_off = stack.start_agent("agent-a", API_URL=proxy.url, EXPLOOP_SIMULATED_SCAN="0.5s",
                                    MAX_CONCURRENT_JOBS="2")
        stack.start_agent("agent-b", EXPLOOP_SIMULATED_SCAN="0.5s", MAX_CONCURRENT_JOBS="2")
        stack.wait_agent_online(count=2)
        warmup = [stack.submit(tenant) for _ in range(6)]
        for job_id in warmup:
            stack.wait_job(tenant, job_id)
        proxy.cut()
        stack.wait_for(lambda: "lease expired: no renewal" in cut_off.output(), 30, "agent-a fenced")
        # agent-b renews all along: agent-a's silence is its own, not an outage.
        stack.wait_for(lambda: "lease expired agent=agent-a" in stack.controller.output(), 30, "expired")
        fenced_log = len(cut_off.output())
        during = [stack.submit(tenant) for _ in range(10)]
        for job_id in during:
            assert stack.wait_job(tenant, job_id)["agent"] == "agent-b"
        # Fenced: agent-a took none of them (not even a message it could not claim).
        after_fence = cut_off.output()[fenced_log:]
        assert "job started" not in after_fence and "while claiming" not in after_fence
        proxy.heal()
        stack.wait_for(lambda: "lease renewed after it expired" in cut_off.output(), 30, "agent-a back")
        stack.wait_agent_online(count=2)
        after = [stack.submit(tenant) for _ in range(10)]
        for job_id in after:
            stack.wait_job(tenant, job_id)
        all_jobs = warmup + during + after
        started = executions(stack.agents)
        assert [j for j in all_jobs if started.get(j) != 1] == []  # 0 executed twice, none lost
        assert all(stack.job(j)["attempt"] == 1 for j in all_jobs)
        assert any(stack.job(j)["agent"] == "agent-a" for j in after)  # consuming again
    finally:
        proxy.close()


FAKE_GIT = """#!/bin/sh
# A git whose fetch hangs: the checkout of a job stays in progress until killed.
case "$*" in
  *fetch*) echo $$ >> {pids}; exec sleep 300 ;;
esac
exit 0
"""


def test_scanners_die_with_a_killed_agent_and_its_checkouts_are_swept(stack, tmp_path):
    stack.start_api()
    tenant = stack.tenant()
    bin_dir, tmp_dir, home = tmp_path / "bin", tmp_path / "agent-tmp", tmp_path / "home-a"
    for d in (bin_dir, tmp_dir, home):
        d.mkdir()
    pids = tmp_path / "git-pids"
    (bin_dir / "git").write_text(FAKE_GIT.format(pids=pids))
    (bin_dir / "git").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_dir), "MAX_CONCURRENT_JOBS": "1"}
    agent = stack.start_agent("agent-a", home=home, **env)
    stack.wait_agent_online("agent-a")
    # A local repository: the destination policy lets it through, so the (fake, hanging) git runs.
    job_id = stack.submit(tenant, repo_url=make_git_repo(tmp_path / "repo", {"app.py": "x = 1\n"}))
    stack.wait_for(lambda: pids.exists() and pids.read_text().strip(), 30, "checkout in progress")
    scanner = int(pids.read_text().split()[0])
    checkouts = tmp_dir / "exploop-work-agent-a"
    assert alive(scanner) and len(list(checkouts.iterdir())) == 1
    os.kill(agent.pid, signal.SIGKILL)  # the agent's main process only, as the OOM killer would
    stack.wait_for(lambda: not alive(scanner), 30, "scanner gone with its agent")
    assert list(checkouts.iterdir())  # nobody cleaned up after the kill
    agent.wait(timeout=10)
    agent.stopped = True
    # Drained, so the restarted agent does not take the requeued job: this is about the sweep.
    stack.admin("POST", "/admin/v1/agents/agent-a/drain")
    restarted = stack.start_agent("agent-a", home=home, **env)
    stack.wait_for(lambda: "removed 1 checkout(s) left by a previous run" in restarted.output(), 30, "sweep")
    assert list(checkouts.iterdir()) == []
    # Requeued when the new incarnation renewed.
    stack.wait_for(lambda: stack.job(job_id)["attempt"] == 2, 30, "job requeued")
