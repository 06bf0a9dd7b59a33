"""A broker ``global_keyprefix`` set by the operator: queue depth, queue repair and HTTP polling
all follow kombu's key layout (real API, controller and Redis processes)."""
from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.e2e

PREFIX = "tenant-fleet:"


def test_key_prefix_depth_repair_and_poll(stack, redis_client):
    stack.env["EXPLOOP_CELERY__broker_transport_options__global_keyprefix"] = PREFIX
    stack.start_api()
    stack.start_controller()
    tenant = stack.tenant()
    reply = stack.admin("POST", "/admin/v1/agents", json={
        "name": "http-prefixed", "region": "us-east-1", "capabilities": ["secrets"], "max_jobs": 2})
    assert reply.status_code == 201, reply.text
    agent_key = reply.json()["api_key"]

    def depth() -> int | None:
        return stack.admin("GET", "/admin/v1/cluster-info").json()["queues"].get("secrets.us-east-1")

    job_id = stack.submit(tenant)
    # The message lives under the prefixed key, exactly where kombu's consumers look.
    assert redis_client.llen(PREFIX + "secrets.us-east-1") == 1
    assert not redis_client.exists("secrets.us-east-1")
    assert depth() == 1

    # Queue repair: the message is lost; the controller publishes it again, once.
    redis_client.delete(PREFIX + "secrets.us-east-1")
    assert depth() == 0
    stack.wait_for(lambda: depth() == 1, 30, "the controller to republish the lost message")
    assert stack.job(job_id)["status"] == "queued"

    # HTTP polling pops from the prefixed key and hands the job out.
    got = requests.post(stack.url + "/platform/poll", json={"timeout": 5},
                        headers={"Authorization": f"Bearer {agent_key}"}, timeout=30)
    assert got.status_code == 200, got.text
    assert got.json()["job_id"] == job_id
    assert got.json()["queue"] == PREFIX + "secrets.us-east-1"
    assert depth() == 0
    # No second copy was published while the first was present (the repair read the right key).
    republished = stack.controller.output().count("publishing again")
    assert republished == 1, stack.controller.output()

    config = requests.get(stack.url + "/platform/config", headers={"Authorization": f"Bearer {agent_key}"},
                          timeout=10).json()
    assert config["broker_key_prefix"] == PREFIX

    # A Celery agent gets the prefix from /platform/config and consumes the prefixed queue.
    stack.start_agent(CAPABILITIES="secrets")
    stack.wait_agent_online()
    second = stack.submit(tenant)
    stack.wait_for(lambda: stack.job(second)["status"] in ("running", "completed", "failed"), 60,
                   "the Celery agent to take the job from the prefixed queue")
