"""Requeue time after a fast restart: `kill -9` of an agent running a job, then the same agent
started again at once (Docker's restart policy, the kubelet), well inside its lease TTL.

Prints, per run, the time from the restart to the requeue of the job the killed process
held, and its ratio to HEARTBEAT_INTERVAL (target <= 1: the new incarnation's first renewal
requeues it; without incarnations the job waited for its time limit). The restart time is
measured from launching the new process, so the ratio includes the agent's start-up.

    python bench/restart_recovery.py [--interval 5s] [--runs 3]
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
    parser.add_argument("--interval", default="5s", help="the agent's HEARTBEAT_INTERVAL (lease TTL = 3x)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    heartbeat = parse_duration(args.interval)
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
            token = requests.post(url + "/admin/v1/tokens", json={}, headers=h).json()["token"]
            agent_env = dict(os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION="bench", CAPABILITIES="secrets",
                             MAX_CONCURRENT_JOBS="1", HEARTBEAT_INTERVAL=args.interval, LOG_LEVEL="warn",
                             METRICS_PORT="off", HOME=str(tmp / "home"), EXPLOOP_SIMULATED_SCAN="1h",
                             AGENT_NAME="agent-bench")

            def start() -> Child:
                child = Child("agent", [script("exploop-agent")], env=agent_env, log_path=tmp / "agent.log")
                children.append(child)
                return child

            def job_view(job_id):
                return requests.get(f"{url}/admin/v1/jobs/{job_id}", headers=h).json()

            agent = start()
            results = []
            for run in range(args.runs):
                job_id = requests.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {tenant}"},
                                       json={"repo_url": "https://x.invalid/r.git", "capability": "secrets",
                                             "region": "bench"}).json()["id"]
                while (view := job_view(job_id))["status"] != "running":
                    time.sleep(0.05)
                attempt = view["attempt"]
                agent.kill()
                restarted = time.monotonic()
                agent = start()
                while job_view(job_id)["attempt"] == attempt:
                    time.sleep(0.05)
                results.append(time.monotonic() - restarted)
                print(f"run {run + 1}: restart -> job requeued in {results[-1]:.2f}s"
                      f" ({results[-1] / heartbeat:.2f} heartbeats)")
                requests.post(f"{url}/admin/v1/jobs/{job_id}/cancel", headers=h)
            worst = max(results)
            print(f"heartbeat {heartbeat:.1f}s, lease TTL {3 * heartbeat:.1f}s; worst requeue after restart"
                  f" {worst:.2f}s; ratio worst/heartbeat {worst / heartbeat:.2f} (target <= 1)")
        finally:
            for child in reversed(children):
                child.stop(timeout=10)


if __name__ == "__main__":
    main()
