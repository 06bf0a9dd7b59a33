"""Benchmark a Redis Sentinel failover under a running fleet: kill -> first job completed.

Each run starts a Sentinel-managed Redis (one master, one replica, three sentinels,
down-after-milliseconds ``--down-after``), the API, the controller and two Celery agents
(simulated 0.2 s scans), all configured with the ``sentinel://`` URL. With jobs flowing,
it kills the master with SIGKILL, then keeps submitting one job at a time and prints:

* promoted: kill -> the sentinels name the replica as master;
* first job: kill -> the first job submitted after the kill is completed by an agent
  (the API, the controller and the agents' Celery consumers all on the new master);
* backlog: kill -> every job submitted before the kill is completed.

Asserts nothing.

    .venv/bin/python bench/failover.py [--runs 3] [--down-after 1000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

from exploop.run.children import Child, SentinelGroup, free_port, script, wait_http


def _post(url: str, token: str, path: str, body: dict, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}", **({"Idempotency-Key": key} if key else {})}
    return requests.post(url + path, json=body, headers=headers, timeout=30)


def submit(url: str, tenant: str) -> str:
    """One job, retried with the same Idempotency-Key while the API answers 503."""
    key = uuid.uuid4().hex
    while True:
        try:
            reply = _post(url, tenant, "/api/v1/jobs", {"repo_url": "https://git.example.invalid/a/b.git",
                                                        "capability": "secrets", "region": "us-east-1"}, key)
            if reply.status_code in (200, 201):
                return reply.json()["id"]
        except requests.ConnectionError:
            pass
        time.sleep(0.05)


def status(url: str, admin: str, job_id: str) -> str | None:
    try:
        reply = requests.get(f"{url}/admin/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {admin}"}, timeout=10)
        return reply.json().get("status") if reply.status_code == 200 else None
    except requests.ConnectionError:
        return None


def one_run(tmp: Path, down_after: int) -> dict:
    group = SentinelGroup(tmp, down_after_ms=down_after).start()
    api_port = free_port()
    url = f"http://127.0.0.1:{api_port}"
    env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'bench.db'}",
               EXPLOOP_REDIS_URL=group.url, EXPLOOP_REGIONS="us-east-1", EXPLOOP_JOB_MAX_ATTEMPTS="10")
    children: list[Child] = []
    try:
        children.append(Child("api", [script("exploop"), "api", "--port", str(api_port), "--workers", "1",
                                      "--threads", "8", "--log-level", "warning"], env=env, log_path=tmp / "api.log"))
        wait_http(url + "/health", 60, children[0])
        admin = subprocess.run([script("exploop"), "create-admin-token", "--name", "bench"], env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        children.append(Child("controller", [script("exploop"), "controller", "--interval", "0.5s"], env=env,
                              log_path=tmp / "controller.log"))
        tenant = _post(url, admin, "/admin/v1/tenants", {"name": "bench", "plan": "enterprise"}).json()["api_key"]
        for n in range(2):
            token = _post(url, admin, "/admin/v1/tokens", {"max_uses": 1, "expires": "1h"}).json()["token"]
            home = tmp / f"agent-{n}"
            home.mkdir()
            children.append(Child(f"agent-{n}", [script("exploop-agent")], env=dict(
                os.environ, API_URL=url, HOME=str(home), REGION="us-east-1", CAPABILITIES="secrets",
                MAX_CONCURRENT_JOBS="2", HEARTBEAT_INTERVAL="1s", METRICS_PORT="off", BOOTSTRAP_TOKEN=token,
                AGENT_NAME=f"agent-{n}", EXPLOOP_SIMULATED_SCAN="0.2s"), log_path=tmp / f"agent-{n}.log"))
        warm = submit(url, tenant)
        while status(url, admin, warm) != "completed":
            time.sleep(0.1)
        before = [submit(url, tenant) for _ in range(10)]
        old = group.master_port()
        killed = time.monotonic()
        group.kill_master()
        promoted = first = backlog = None
        pending_before = set(before)
        probe = None
        while first is None or backlog is None:
            now = time.monotonic()
            if now - killed > 180:
                stuck = {j: status(url, admin, j) for j in [*pending_before, *([probe] if probe else [])]}
                raise RuntimeError(f"no recovery within 180 s (first job {first}, backlog {backlog}, still {stuck});"
                                   f" logs kept in {tmp}")
            if promoted is None:
                try:
                    if group.master_port() != old:
                        promoted = now - killed
                except RuntimeError:
                    pass
            if first is None:
                probe = probe or submit(url, tenant)
                if status(url, admin, probe) == "completed":
                    first = time.monotonic() - killed
            if backlog is None:
                pending_before = {j for j in pending_before if status(url, admin, j) != "completed"}
                if not pending_before:
                    backlog = time.monotonic() - killed
            time.sleep(0.05)
        return {"promoted": promoted, "first": first, "backlog": backlog}
    finally:
        for child in reversed(children):
            child.stop(timeout=10)
        group.stop()


def watch_restarts(tmp: Path) -> str:
    """What the agents' StallWatch did: consumers restarted because the master moved or stalled."""
    logs = [path.read_text(errors="replace") for path in sorted(tmp.glob("agent-*.log"))]
    moved = sum(log.count("broker master moved") for log in logs)
    stalled = sum(log.count("consumer stalled") for log in logs)
    return f"consumer restarts: {moved} master moved, {stalled} stalled"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--down-after", type=int, default=1000, help="sentinel down-after-milliseconds")
    args = parser.parse_args()
    results = []
    for n in range(args.runs):
        tmp = tempfile.mkdtemp(prefix="exploop-failover-")
        result = one_run(Path(tmp), args.down_after)
        restarts = watch_restarts(Path(tmp))
        shutil.rmtree(tmp, ignore_errors=True)  # kept when the run failed
        results.append(result)
        print(f"run {n + 1}: promoted {result['promoted'] or float('nan'):5.2f} s   first job completed"
              f" {result['first']:5.2f} s   backlog of 10 completed {result['backlog']:5.2f} s   (after kill -9; {restarts})")
    print(f"\nmedian over {args.runs} runs (down-after-milliseconds {args.down_after}):")
    for key, label in (("promoted", "replica promoted"), ("first", "first job completed"),
                       ("backlog", "jobs queued before the kill completed")):
        values = [r[key] for r in results if r[key] is not None]
        print(f"  {label:40s} {statistics.median(values):5.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
