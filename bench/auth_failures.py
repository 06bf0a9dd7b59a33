"""Failed authentications a real agent fleet produces from one address (one NAT).

The brute-force limit (EXPLOOP_AUTH_FAILURE_LIMIT per AUTH_FAILURE_WINDOW, per client
address and credential kind) must never touch a legitimate fleet. This runs real
``exploop-agent`` processes from 127.0.0.1, all behind "one NAT", and measures:

1. steady state: agents renewing leases every HEARTBEAT_INTERVAL and running jobs;
   renewals (successes) versus failures counted in Redis;
2. mass revocation: every agent deleted at once; failures until every agent exits
   (an agent stops on the first 401 of its lease; a claim in flight may add one);
3. a revoked agent restarted with its saved key (a supervisor restarting it).

Prints failures per revoked agent, from which the limit follows: a NAT hiding A
agents whose keys are all revoked at once produces about A x that number.

    python bench/auth_failures.py [--agents 4] [--seconds 20] [--interval 1s]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exploop.core.throttle import FAILURE_PREFIX  # noqa: E402
from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402


def failures(client: redis.Redis) -> dict[str, int]:
    return {key.decode().removeprefix(FAILURE_PREFIX): int(client.get(key) or 0)
            for key in client.scan_iter(FAILURE_PREFIX + "*")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20, help="steady state duration")
    parser.add_argument("--interval", default="1s", help="agents' HEARTBEAT_INTERVAL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_port, api_port = free_port(), free_port()
        children = [start_redis(redis_port, tmp / "redis.log")]
        store = redis.Redis(port=redis_port)
        url = f"http://127.0.0.1:{api_port}"
        # Limit out of reach: this measures what the fleet does, unthrottled.
        env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'db.sqlite'}",
                   EXPLOOP_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", EXPLOOP_REGIONS="bench",
                   EXPLOOP_AUTH_FAILURE_LIMIT="1000000")
        try:
            api = Child("api", [script("exploop"), "api", "--port", str(api_port), "--workers", "1",
                                "--log-level", "warning"], env=env, log_path=tmp / "api.log")
            children.append(api)
            wait_http(url + "/health", 30, api)
            admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
            h = {"Authorization": f"Bearer {admin}"}
            tenant = requests.post(url + "/admin/v1/tenants", json={"name": "bench"},
                                   headers=h, timeout=10).json()["api_key"]
            token = requests.post(url + "/admin/v1/tokens", json={"max_uses": args.agents},
                                  headers=h, timeout=10).json()["token"]

            def agent_env(i: int) -> dict:
                return dict(os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION="bench",
                            CAPABILITIES="secrets", MAX_CONCURRENT_JOBS="1",
                            HEARTBEAT_INTERVAL=args.interval, LOG_LEVEL="info", METRICS_PORT="off",
                            HOME=str(tmp / f"home-{i}"), EXPLOOP_SIMULATED_SCAN="0.5s",
                            AGENT_NAME=f"nat-agent-{i}")

            agents = [Child(f"agent-{i}", [script("exploop-agent")], env=agent_env(i),
                            log_path=tmp / f"agent-{i}.log") for i in range(args.agents)]
            children.extend(agents)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                listed = requests.get(url + "/admin/v1/agents", headers=h, timeout=10).json()["items"]
                if sum(a["status"] == "online" for a in listed) == args.agents:
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError("agents did not come online")

            # 1. Steady state: renewals and jobs, from one address.
            before = sum(a.output().count("lease renewed successfully") for a in agents)
            started, submitted = time.monotonic(), 0
            while time.monotonic() - started < args.seconds:
                requests.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {tenant}"},
                              json={"repo_url": "https://git.example.invalid/a.git",
                                    "capability": "secrets", "region": "bench"}, timeout=10)
                submitted += 1
                time.sleep(0.5)
            renewals = sum(a.output().count("lease renewed successfully") for a in agents) - before
            steady = failures(store)
            done = requests.get(url + "/admin/v1/jobs", params={"status": "completed"}, headers=h,
                                timeout=10).json()["total"]

            # 2. Every key revoked at once (agents deleted), jobs still flowing.
            for i in range(args.agents):
                requests.delete(f"{url}/admin/v1/agents/nat-agent-{i}", headers=h, timeout=10)
            revoked_at = time.monotonic()
            for a in agents:
                a.wait(timeout=120)
            exit_time = time.monotonic() - revoked_at
            revocation = failures(store)

            # 3. One revoked agent restarted by its supervisor (saved key).
            restarted = Child("restarted", [script("exploop-agent")], env=agent_env(0),
                              log_path=tmp / "restarted.log")
            children.append(restarted)
            restart_code = restarted.wait(timeout=60)
            after_restart = failures(store)
        finally:
            for child in reversed(children):
                child.stop(timeout=10)
    agent_key = "agent:127.0.0.1"
    per_agent = revocation.get(agent_key, 0) / args.agents
    print(f"agents behind one address: {args.agents}, HEARTBEAT_INTERVAL={args.interval}")
    print(f"steady state {args.seconds:.0f}s: {renewals} lease renewals, {submitted} jobs submitted,"
          f" {done} completed; failures counted: {steady or 0}")
    print(f"all keys revoked: {revocation.get(agent_key, 0)} agent-key failures until every agent"
          f" exited ({exit_time:.1f}s): {per_agent:.2f} per agent")
    print(f"revoked agent restarted: exit code {restart_code},"
          f" +{after_restart.get(agent_key, 0) - revocation.get(agent_key, 0)} failure(s)")
    print(f"=> agents whose keys are revoked together behind one address, per failure allowance:"
          f" AUTH_FAILURE_LIMIT / {max(per_agent, 1):.2f}")


if __name__ == "__main__":
    main()
