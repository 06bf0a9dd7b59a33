"""Agent states operators see, with real processes: ``stopping`` then ``offline`` on a graceful
stop (no "lease expired" alert), ``disabled`` by an admin (leases and claims refused), and a
deleted agent that stops working at once."""
from __future__ import annotations

import json
import signal
import time

import pytest
import requests

from exploop.client import ApiClientError, PlatformClient
from exploop.config import agent_key_file
from tests.support.fleet import completions, executions
from tests.support.live_stack import cli

pytestmark = pytest.mark.e2e


def status(stack, name: str) -> str:
    return stack.admin("GET", f"/admin/v1/agents/{name}").json()["status"]


def running_on(stack, job_id):
    job = stack.job(job_id)
    return job["agent"] if job["status"] == "running" else None


def saved_key(home, name: str) -> str:
    """The key the agent named ``name`` saved (one file per agent name)."""
    return json.loads(agent_key_file(home / ".exploop", name).read_text())["api_key"]


def test_a_graceful_stop_shows_stopping_then_offline_without_the_alert(stack):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    agent = stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="4s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, job_id) == "agent-a", 30, "job running")
    agent.signal(signal.SIGTERM)
    stack.wait_for(lambda: status(stack, "agent-a") == "stopping", 10, "agent-a stopping")
    assert agent.wait(timeout=30) == 0
    view = stack.admin("GET", "/admin/v1/agents/agent-a").json()
    assert view["status"] == "offline" and view["stopped_at"] is not None
    assert stack.job(job_id)["status"] == "completed"
    # Well past the lease TTL (3s) and several controller ticks (0.5s): still no alert.
    time.sleep(4)
    assert "lease expired" not in stack.controller.output()
    metrics = requests.get(stack.url + "/metrics", timeout=10).text
    for state in ("online", "draining", "disabled", "stopping", "offline"):
        assert f'exploop_agents{{region="us-east-1",status="{state}"}}' in metrics


def test_a_disabled_agent_is_refused_leases_and_claims_until_enabled(stack, tmp_path):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    home = tmp_path / "home-a"
    home.mkdir()
    agent = stack.start_agent("agent-a", home=home, EXPLOOP_SIMULATED_SCAN="20s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, job_id) == "agent-a", 30, "job running")

    result = cli(stack, "disable", "agent", "agent-a")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "agent/agent-a disabled: takes no jobs until enabled; 1 running job requeued"
    assert status(stack, "agent-a") == "disabled"
    assert stack.job(job_id)["attempt"] == 2  # requeued at once
    client = PlatformClient(stack.url, saved_key(home, "agent-a"))
    for call in (lambda: client.renew_lease({"heartbeat_interval": 1}), lambda: client.claim(job_id, 2)):
        with pytest.raises(ApiClientError) as refused:
            call()
        assert refused.value.status == 403 and refused.value.detail == {"reason": "disabled"}
        assert "agent 'agent-a' is disabled by an admin" in refused.value.message
    stack.wait_for(lambda: "agent disabled by an admin" in agent.output(), 10, "agent told")
    # The first attempt's scan stops at its next progress report (the job is no longer its own).
    stack.wait_for(lambda: "job stopped" in agent.output(), 10, "scan stopped")
    assert agent.alive() and status(stack, "agent-a") == "disabled"

    result = cli(stack, "enable", "agent", "agent-a")
    assert result.exit_code == 0 and "agent/agent-a enabled" in result.stdout
    stack.wait_for(lambda: "lease renewed after being disabled" in agent.output(), 10, "agent resumes")
    stack.wait_for(lambda: running_on(stack, job_id) == "agent-a", 30, "requeued job runs on agent-a")
    assert status(stack, "agent-a") == "online"
    audit = stack.admin("GET", "/admin/v1/audit", params={"target": "agent-a"}).json()["items"]
    assert {"disable agent", "enable agent"} <= {event["action"] for event in audit}


def test_a_deleted_agent_kills_its_scans_and_says_so_once(stack):
    stack.start_api()
    tenant = stack.tenant()
    agent = stack.start_agent("agent-a", EXPLOOP_SIMULATED_SCAN="30s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-a")
    job_id = stack.submit(tenant)
    stack.wait_for(lambda: running_on(stack, job_id) == "agent-a", 30, "job running")
    assert cli(stack, "delete", "agent", "agent-a", "--yes").exit_code == 0
    assert agent.wait(timeout=30) == 1  # well before the 30s scan could have finished
    out = agent.output()
    assert out.count("authentication failed") == 1
    assert "job completed" not in out and executions([agent])[job_id] == 1
    assert completions([agent]).get(job_id) is None
    assert stack.job(job_id)["status"] == "queued" and stack.job(job_id)["attempt"] == 2
