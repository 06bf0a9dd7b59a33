"""HTTPS-only agents: ``POST /platform/poll`` handouts and the ``AGENT_TRANSPORT=http`` agent.

Real API, controller, Redis and agent processes; simulated scans (a sleep) where a test
needs to control how long a job runs.
"""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from exploop.core.handouts import EXPIRY, HANDOUTS

pytestmark = pytest.mark.e2e


def make_agent(stack, name, capabilities=("secrets",), max_jobs=2) -> str:
    reply = stack.admin("POST", "/admin/v1/agents", json={
        "name": name, "region": "us-east-1", "capabilities": list(capabilities), "max_jobs": max_jobs})
    assert reply.status_code == 201, reply.text
    return reply.json()["api_key"]


def agent_call(stack, key, method, path, **kw) -> requests.Response:
    return requests.request(method, stack.url + path, headers={"Authorization": f"Bearer {key}"},
                            timeout=60, **kw)


def poll(stack, key, timeout=5.0) -> requests.Response:
    return agent_call(stack, key, "POST", "/platform/poll", json={"timeout": timeout})


def test_poll_hands_out_claim_within_window_else_refused(stack, redis_client):
    stack.env.update(EXPLOOP_POLL_CLAIM_WINDOW="1s")
    stack.start_api()
    tenant = stack.tenant()
    key = make_agent(stack, "http-a")

    started = time.monotonic()
    empty = poll(stack, key, timeout=1)
    assert empty.status_code == 204 and 0.9 <= time.monotonic() - started < 5

    job_id = stack.submit(tenant)
    got = poll(stack, key, timeout=5)
    assert got.status_code == 200, got.text
    handout = got.json()
    assert handout["job_id"] == job_id and handout["attempt"] == 1 and handout["claim_within"] == 1
    assert redis_client.hexists(HANDOUTS, job_id) and redis_client.zscore(EXPIRY, job_id)
    assert redis_client.llen("secrets.us-east-1") == 0

    # Another agent cannot use this handout.
    other = make_agent(stack, "http-b")
    stolen = agent_call(stack, other, "POST", f"/platform/jobs/{job_id}/claim",
                        json={"attempt": 1, "handout_id": handout["handout_id"]})
    assert stolen.status_code == 409 and stolen.json()["error"] == "handout expired"

    time.sleep(1.2)  # past the claim window: a late claim is refused
    late = agent_call(stack, key, "POST", f"/platform/jobs/{job_id}/claim",
                      json={"attempt": 1, "handout_id": handout["handout_id"]})
    assert late.status_code == 409 and late.json()["error"] == "handout expired", late.text
    assert stack.job(job_id)["status"] == "queued"

    # With no controller running, the handout stays until restored; a new job's claim works.
    second = stack.submit(tenant)
    got2 = poll(stack, key).json()
    assert got2["job_id"] == second
    claimed = agent_call(stack, key, "POST", f"/platform/jobs/{second}/claim",
                         json={"attempt": 1, "handout_id": got2["handout_id"]})
    assert claimed.status_code == 200 and claimed.json()["job_token"]
    assert not redis_client.hexists(HANDOUTS, second)
    again = agent_call(stack, key, "POST", f"/platform/jobs/{second}/claim",
                       json={"attempt": 1, "handout_id": got2["handout_id"]})
    assert again.status_code == 409


def test_poll_with_revoked_or_deleted_key_is_401(stack):
    stack.start_api()
    key = make_agent(stack, "gone")
    assert poll(stack, key, timeout=0.1).status_code == 204
    assert stack.admin("DELETE", "/admin/v1/agents/gone").status_code in (200, 204)
    refused = poll(stack, key, timeout=0.1)
    assert refused.status_code == 401 and refused.json()["error"].startswith("authentication failed")
    assert poll(stack, "ragent_not-a-key", timeout=0.1).status_code == 401


def test_drained_agent_polls_get_no_job(stack, redis_client):
    stack.start_api()
    tenant = stack.tenant()
    key = make_agent(stack, "drained")
    assert stack.admin("POST", "/admin/v1/agents/drained/drain").status_code == 200
    job_id = stack.submit(tenant)
    started = time.monotonic()
    reply = poll(stack, key, timeout=1)
    assert reply.status_code == 204 and time.monotonic() - started >= 0.9
    assert redis_client.llen("secrets.us-east-1") == 1 and stack.job(job_id)["status"] == "queued"


def raw_poll_then_hang_up(stack, key, timeout=5.0) -> None:
    """Send a poll and close the socket before the answer: the response is lost."""
    url = urlparse(stack.url)
    body = json.dumps({"timeout": timeout}).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=5)
    sock.sendall(b"POST /platform/poll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(0.3)  # the server has read the request and is holding it
    sock.close()


def test_dropped_poll_response_job_restored_and_completes_once(stack, redis_client):
    stack.env.update(EXPLOOP_POLL_CLAIM_WINDOW="2s")
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    key = make_agent(stack, "lossy")
    raw_poll_then_hang_up(stack, key)
    job_id = stack.submit(tenant)
    # The held poll takes the job and its answer goes nowhere: a handout nobody claims.
    stack.wait_for(lambda: redis_client.hexists(HANDOUTS, job_id), 10, "handout recorded")
    assert redis_client.llen("secrets.us-east-1") == 0
    # After the claim window the controller puts it back, attempt unchanged...
    stack.wait_for(lambda: redis_client.llen("secrets.us-east-1") == 1, 10, "job back on its queue")
    assert not redis_client.hexists(HANDOUTS, job_id)
    assert "handout expired, job back on its queue" in stack.controller.output()
    # ...and an HTTP agent runs it, once.
    stack.start_agent("lossy", API_KEY=key, AGENT_TRANSPORT="http", EXPLOOP_SIMULATED_SCAN="0.5s",
                      POLL_TIMEOUT="5s")
    job = stack.wait_job(tenant, job_id, timeout=30)
    assert job["status"] == "completed" and job["attempt"] == 1
    assert stack.job(job_id)["agent"] == "lossy"  # the HTTP agent, with lossy's key
    time.sleep(1.5)
    assert stack.job(job_id)["attempt"] == 1 and redis_client.llen("secrets.us-east-1") == 0


def running_on(stack, job_id):
    job = stack.job(job_id)
    return job["agent"] if job["status"] == "running" else None


def test_http_and_celery_agents_share_one_fleet_and_queue(stack, redis_client):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant(plan="pro")
    stack.start_agent("celery-a", EXPLOOP_SIMULATED_SCAN="1s", MAX_CONCURRENT_JOBS="1")
    stack.start_agent("http-a", AGENT_TRANSPORT="http", EXPLOOP_SIMULATED_SCAN="1s",
                      MAX_CONCURRENT_JOBS="1", POLL_TIMEOUT="5s")
    stack.wait_agent_online(count=2)
    job_ids = [stack.submit(tenant) for _ in range(6)]
    ran_on = {}
    for job_id in job_ids:
        job = stack.wait_job(tenant, job_id, timeout=60)
        assert job["status"] == "completed" and job["attempt"] == 1
        agent = stack.job(job_id)["agent"]
        ran_on[agent] = ran_on.get(agent, 0) + 1
    assert set(ran_on) == {"celery-a", "http-a"}, ran_on
    assert redis_client.hlen(HANDOUTS) == 0
    # The HTTP agent never talked to the broker: Redis saw only the API, controller and Celery agent.
    http_log = stack.agents[1].output()
    assert "transport=http" in http_log and "job completed" in http_log
    assert "broker" not in http_log.lower() and "amqp" not in http_log.lower()


def test_kill_9_http_agent_mid_job_completes_elsewhere_once(stack):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    # http-a's scan outlasts the test: it is still running when http-a is killed, however slow the host.
    first = stack.start_agent("http-a", AGENT_TRANSPORT="http", EXPLOOP_SIMULATED_SCAN="120s",
                              MAX_CONCURRENT_JOBS="1", POLL_TIMEOUT="5s")
    stack.wait_agent_online("http-a")
    job_id = stack.submit(tenant)
    assert stack.wait_for(lambda: running_on(stack, job_id), 20, "job running") == "http-a"
    stack.start_agent("http-b", AGENT_TRANSPORT="http", EXPLOOP_SIMULATED_SCAN="3s",
                      MAX_CONCURRENT_JOBS="1", POLL_TIMEOUT="5s")
    stack.wait_agent_online("http-b")
    first.kill()
    job = stack.wait_job(tenant, job_id, timeout=3 + 10 + 3 + 5)
    assert job["status"] == "completed" and stack.job(job_id)["agent"] == "http-b"
    assert job["attempt"] == 2
    assert "lease expired agent=http-a" in stack.controller.output()
    time.sleep(1)
    assert stack.job(job_id)["attempt"] == 2
    assert stack.admin("GET", "/admin/v1/agents/http-a").json()["status"] == "offline"


def test_drained_http_agent_takes_no_job_and_sigterm_finishes_running_job(stack, redis_client):
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    agent = stack.start_agent("http-a", AGENT_TRANSPORT="http", EXPLOOP_SIMULATED_SCAN="2s",
                              MAX_CONCURRENT_JOBS="2", POLL_TIMEOUT="2s")
    stack.wait_agent_online("http-a")
    assert stack.admin("POST", "/admin/v1/agents/http-a/drain").status_code == 200
    stack.wait_for(lambda: "draining: stopped polling" in agent.output(), 10, "drain applied")
    waiting = stack.submit(tenant)
    time.sleep(4)  # longer than a poll and a claim window
    assert stack.job(waiting)["status"] == "queued"
    assert redis_client.hlen(HANDOUTS) == 0

    assert stack.admin("POST", "/admin/v1/agents/http-a/uncordon").status_code == 200
    stack.wait_for(lambda: running_on(stack, waiting), 15, "job running after uncordon")
    # SIGTERM mid-job: stop polling, finish the running job, release the lease, exit 0.
    started = time.monotonic()
    assert agent.stop(timeout=20) == 0
    assert stack.job(waiting)["status"] == "completed"
    assert time.monotonic() - started < 15
    assert "warm shutdown" in agent.output()
    assert stack.admin("GET", "/admin/v1/agents/http-a").json()["status"] == "offline"
