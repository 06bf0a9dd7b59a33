"""Recovery time: from `kill -9` of the agent running a job to that job running again elsewhere.

Prints the time and its ratio to the lease TTL (3 x HEARTBEAT_INTERVAL): recovery
is driven by lease expiry, so the ratio should stay a little above 1.

    python bench/recovery.py [--interval 2s] [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exploop.config import parse_duration  # noqa: E402
from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", default="2s", help="agents' HEARTBEAT_INTERVAL")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ttl = 3 * parse_duration(args.interval)
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_port, api_port = free_port(), free_port()
        children = [start_redis(redis_port, tmp / "redis.log")]
        url = f"http://127.0.0.1:{api_port}"
        env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'db.sqlite'}",
                   EXPLOOP_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", EXPLOOP_REGIONS="bench",
                   EXPLOOP_JOB_MAX_ATTEMPTS="100")
        try:
            api = Child("api", [script("exploop"), "api", "--port", str(api_port), "--workers", "1",
                                "--log-level", "warning"], env=env, log_path=tmp / "api.log")
            children.append(api)
            wait_http(url + "/health", 30, api)
            children.append(Child("controller", [script("exploop"), "controller", "--interval", "0.5s"],
                                  env=env, log_path=tmp / "controller.log"))
            admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
            h = {"Authorization": f"Bearer {admin}"}
            tenant = requests.post(url + "/admin/v1/tenants", json={"name": "bench"}, headers=h).json()["api_key"]

            def agent(name: str, region: str) -> Child:
                token = requests.post(url + "/admin/v1/tokens", json={}, headers=h).json()["token"]
                child = Child(name, [script("exploop-agent")], log_path=tmp / f"{name}.log", env=dict(
                    os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION=region, CAPABILITIES="secrets",
                    MAX_CONCURRENT_JOBS="1", HEARTBEAT_INTERVAL=args.interval, LOG_LEVEL="warn", METRICS_PORT="off",
                    HOME=str(tmp / f"home-{name}"), EXPLOOP_SIMULATED_SCAN="1h", AGENT_NAME=name))
                children.append(child)
                return child

            def job_view(job_id):
                return requests.get(f"{url}/admin/v1/jobs/{job_id}", headers=h).json()

            results = []
            for run in range(args.runs):
                # Each run has its own region (queues), so earlier runs cannot interfere.
                region = f"bench-{run}"
                agents = {name: agent(name, region) for name in (f"agent-{run}-a", f"agent-{run}-b")}
                while sum(a["status"] == "online" for a in requests.get(
                        url + "/admin/v1/agents", params={"region": region}, headers=h).json()["items"]) < 2:
                    time.sleep(0.2)
                job_id = requests.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {tenant}"},
                                       json={"repo_url": "https://x.invalid/r.git", "capability": "secrets",
                                             "region": region}).json()["id"]
                while (view := job_view(job_id))["status"] != "running":
                    time.sleep(0.05)
                holder = view["agent"]
                killed = time.monotonic()
                agents[holder].kill()
                while not ((view := job_view(job_id))["status"] == "running" and view["agent"] != holder):
                    time.sleep(0.05)
                results.append(time.monotonic() - killed)
                print(f"run {run + 1}: kill -9 -> running again on {view['agent']} in {results[-1]:.2f}s"
                      f" (attempt {view['attempt']})")
                for child in agents.values():
                    child.kill()
            mean = sum(results) / len(results)
            print(f"lease TTL {ttl:.1f}s; mean recovery {mean:.2f}s; ratio recovery/TTL {mean / ttl:.2f}")
        finally:
            for child in reversed(children):
                child.stop(timeout=10)


if __name__ == "__main__":
    main()
