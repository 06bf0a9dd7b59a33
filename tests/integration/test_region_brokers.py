"""Region-sharded brokers with real processes: two Redis servers, the API, the controller
and Celery agents. Jobs of a region live only on that region's broker; losing one broker
leaves the other region working and its own jobs waiting, repaired when it returns."""
from __future__ import annotations

import pytest
import redis as redis_lib
import requests

from exploop.procs import free_port, start_redis

pytestmark = pytest.mark.e2e


def keys(client) -> list[str]:
    return sorted(k.decode() for k in client.keys("*"))


def test_each_region_on_its_broker_and_an_outage_stays_in_its_region(stack, redis_client, tmp_path):
    port_b = free_port()
    redis_b = start_redis(port_b, tmp_path / "redis-b.log")
    url_b = f"redis://127.0.0.1:{port_b}/0"
    client_b = redis_lib.Redis.from_url(url_b)
    stack.env.update(EXPLOOP_REGIONS="us-east-1,eu-west-1", EXPLOOP_REGION_BROKERS=f"eu-west-1={url_b}",
                     EXPLOOP_POLL_CLAIM_WINDOW="1s")
    try:
        stack.start_api()
        stack.start_controller()
        tenant = stack.tenant()
        stack.start_agent("agent-us", EXPLOOP_SIMULATED_SCAN="0.2s", CAPABILITIES="secrets")
        stack.wait_agent_online("agent-us")

        # An agent of eu-west-1 is handed eu-west-1's broker; one of us-east-1 the default.
        reply = stack.admin("POST", "/admin/v1/agents", json={
            "name": "poller-eu", "region": "eu-west-1", "capabilities": ["secrets"], "max_jobs": 1})
        assert reply.status_code == 201, reply.text
        eu_key = {"Authorization": f"Bearer {reply.json()['api_key']}"}
        config = requests.get(stack.url + "/platform/config", headers=eu_key, timeout=10).json()
        assert config["broker_url"] == url_b
        assert config["broker_transport_options"]["visibility_timeout"] == config["visibility_timeout"]

        us_job = stack.submit(tenant, region="us-east-1")
        eu_job = stack.submit(tenant, region="eu-west-1")
        assert stack.wait_job(tenant, us_job)["status"] == "completed"
        assert client_b.llen("secrets.eu-west-1") == 1
        assert not [k for k in keys(client_b) if "us-east-1" in k]
        assert not [k for k in keys(redis_client) if "eu-west-1" in k]
        info = stack.admin("GET", "/admin/v1/cluster-info").json()
        assert info["brokers"]["default"]["status"] == "ok"
        assert info["brokers"]["eu-west-1"] == {"url": url_b, "regions": ["eu-west-1"], "status": "ok"}
        assert info["queues"]["secrets.eu-west-1"] == 1

        # An HTTP poll pops from eu-west-1's broker; the unclaimed handout goes back there.
        got = requests.post(stack.url + "/platform/poll", json={"timeout": 5}, headers=eu_key, timeout=30)
        assert got.status_code == 200 and got.json()["job_id"] == eu_job
        assert client_b.llen("secrets.eu-west-1") == 0
        stack.wait_for(lambda: client_b.llen("secrets.eu-west-1") == 1, 20, "the handout restored on broker B")

        # Broker B goes away with its messages: region us-east-1 keeps working...
        redis_b.kill()
        info = stack.admin("GET", "/admin/v1/cluster-info").json()
        assert info["brokers"]["eu-west-1"]["status"].startswith("error")
        assert info["queues"]["secrets.eu-west-1"] is None
        assert info["brokers"]["default"]["status"] == "ok"
        us_during = stack.submit(tenant, region="us-east-1")
        eu_during = stack.submit(tenant, region="eu-west-1")  # accepted, waits for its broker
        assert stack.wait_job(tenant, us_during)["status"] == "completed"
        assert stack.job(eu_during)["status"] in ("pending", "queued")
        assert stack.job(eu_job)["status"] == "queued"

        # ...and when B returns (empty), the controller republishes what it lost.
        redis_b = start_redis(port_b, tmp_path / "redis-b2.log")
        stack.wait_for(lambda: client_b.llen("secrets.eu-west-1") == 2, 30, "eu-west-1's jobs back on broker B")
        stack.start_agent("agent-eu", REGION="eu-west-1", EXPLOOP_SIMULATED_SCAN="0.2s", CAPABILITIES="secrets")
        for job_id in (eu_job, eu_during):
            job = stack.wait_job(tenant, job_id)
            assert job["status"] == "completed" and job["agent"] == "agent-eu"
        assert not [k for k in keys(redis_client) if "eu-west-1" in k]
        # The controller kept working for us-east-1 throughout: no tick failed on B's outage.
        assert f"broker redis://127.0.0.1:{port_b}/0 unreachable" in stack.controller.output()
        assert "controller tick failed" not in stack.controller.output()
    finally:
        client_b.close()
        redis_b.stop()
