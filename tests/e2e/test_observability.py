"""Metrics, Flower and a real Prometheus scrape, against live processes."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exploop.run.children import Child, free_port, script, wait_http

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def scrape(url: str) -> dict[tuple, float]:
    text = requests.get(url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_agent_metrics_count_jobs_from_prefork_children(stack, tmp_path):
    stack.start_api()
    tenant = stack.tenant()
    port = free_port()
    stack.start_agent("agent-m", METRICS_PORT=str(port), EXPLOOP_SIMULATED_SCAN="0.2s",
                      MAX_CONCURRENT_JOBS="3")
    stack.wait_agent_online("agent-m")
    url = f"http://127.0.0.1:{port}/metrics"
    labels = {"agent_name": "agent-m", "region": "us-east-1"}
    samples = scrape(url)
    assert value(samples, "exploop_agent_status", **labels) == 1
    assert value(samples, "exploop_agent_max_jobs", **labels) == 3
    assert 0 < value(samples, "exploop_agent_lease_ttl_seconds", **labels) <= 3
    assert value(samples, "exploop_agent_heartbeat_latency_seconds_count", **labels) >= 1
    assert value(samples, "exploop_agent_memory_bytes", **labels) > 10_000_000
    job_ids = [stack.submit(tenant) for _ in range(6)]
    for job_id in job_ids:
        stack.wait_job(tenant, job_id)
    samples = scrape(url)
    assert value(samples, "exploop_agent_jobs_completed_total", **labels) == 6
    assert value(samples, "exploop_agent_jobs_failed_total", **labels) == 0
    assert value(samples, "exploop_agent_jobs_running", **labels) == 0


def test_api_metrics_expose_queue_depth_jobs_agents_and_latency(stack):
    stack.start_api()
    tenant = stack.tenant()
    for _ in range(3):
        stack.submit(tenant)  # no agent yet: they wait in the queue
    samples = scrape(stack.url + "/metrics")
    assert value(samples, "exploop_queue_depth", queue="secrets.us-east-1") == 3
    assert value(samples, "exploop_queue_consumers", queue="secrets.us-east-1") == 0  # nobody runs them
    assert value(samples, "exploop_jobs", status="queued") == 3
    assert any(name == "exploop_api_request_duration_seconds_count" and dict(labels).get("endpoint") == "/api/v1/jobs"
               for name, labels in samples)
    stack.start_agent("agent-x", EXPLOOP_SIMULATED_SCAN="0.1s")
    stack.wait_agent_online("agent-x")
    stack.wait_for(lambda: value(scrape(stack.url + "/metrics"), "exploop_jobs", status="completed") == 3,
                   30, "3 completed")
    samples = scrape(stack.url + "/metrics")
    assert value(samples, "exploop_agents", status="online", region="us-east-1") == 1
    assert value(samples, "exploop_capacity_jobs_max", region="us-east-1") == 2
    assert value(samples, "exploop_queue_depth", queue="secrets.us-east-1") == 0
    assert value(samples, "exploop_queue_consumers", queue="secrets.us-east-1") == 1
    assert value(samples, "exploop_job_queue_wait_seconds_count", capability="secrets", region="us-east-1") == 3


def test_flower_lists_the_running_agent(stack, tmp_path):
    stack.start_api()
    stack.start_agent("agent-f")
    stack.wait_agent_online("agent-f")
    port = free_port()
    flower = Child("flower", [script("celery"), "--broker", stack.redis_url, "flower", f"--port={port}",
                              "--address=127.0.0.1"],
                   env=dict(os.environ, FLOWER_UNAUTHENTICATED_API="true"), log_path=tmp_path / "flower.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthcheck", 30, flower)
        workers = stack.wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/api/workers", timeout=15).json(),
                                 30, "Flower to see a worker")
        assert any(name.startswith("agent-f@") for name in workers)
    finally:
        flower.stop()


@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus not installed (.ci/run installs it)")
def test_prometheus_scrapes_the_agent_and_the_api(stack, tmp_path):
    stack.start_api()
    tenant = stack.tenant()
    metrics_port = free_port()
    stack.start_agent("agent-p", METRICS_PORT=str(metrics_port))
    stack.wait_agent_online("agent-p")
    stack.submit(tenant, capability="sca")  # stays queued: nobody runs sca here... agent has sca
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: agents
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
  - job_name: api
    static_configs: [{{targets: ["{stack.url.removeprefix('http://')}"]}}]
""")
    prom = Child("prometheus", ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], log_path=tmp_path / "prometheus.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 30, prom)

        def query(expr):
            reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
            return reply["data"]["result"]

        up = stack.wait_for(lambda: query('exploop_agent_status{agent_name="agent-p"} == 1'), 30, "agent status")
        assert up[0]["metric"]["region"] == "us-east-1"
        depth = stack.wait_for(lambda: query("exploop_queue_depth"), 30, "queue depth")
        assert {r["metric"]["queue"] for r in depth} >= {"sca.us-east-1", "secrets.us-east-1"}
    finally:
        prom.stop()


def test_json_logs_and_high_memory_warning(stack):
    import json
    stack.start_api()
    agent = stack.start_agent("agent-j", LOG_FORMAT="json", MEMORY_LIMIT="64m", MEMORY_WARN_RATIO="0.5")
    stack.wait_agent_online("agent-j")
    time.sleep(1.5)
    lines = [json.loads(line) for line in agent.output().splitlines() if line.startswith("{")]
    renewed = [entry for entry in lines if entry["message"].startswith("lease renewed successfully")]
    assert renewed and renewed[0]["agent"] == "agent-j" and renewed[0]["level"] == "info"
    assert any(e["message"].startswith("agent registered") and e["name"] == "agent-j" for e in lines)
    high = [entry for entry in lines if entry["message"].startswith("high memory usage")]
    assert high and high[0]["level"] == "warning" and int(high[0]["limit_bytes"]) == 64 * 1024 ** 2
