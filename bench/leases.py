"""Lease renewals per second through the API versus a bare Flask `SET ... EX` endpoint.

Both servers run under the same gunicorn settings (1 process, gthread) on the same
Redis, driven by the same load generator (processes x threads of keep-alive HTTP
clients, each acting as a distinct agent). Prints both rates, their ratio (target
>= 0.8), and how many agents one API process carries at a 30 s heartbeat.

    python bench/leases.py [--seconds 10] [--agents 64]
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402

BODY = {"status": "active", "running_jobs": [], "jobs_running": 0, "max_jobs": 5,
        "version": "bench", "host": "bench", "heartbeat_interval": 30,
        "incarnation": "0123456789abcdef0123456789abcdef"}  # as every agent sends: the hot path compares it


def _client_process(port: int, keys: list[str], seconds: float, queue) -> None:
    count = [0] * len(keys)
    deadline = time.monotonic() + seconds

    def run(i: int, key: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        payload = json.dumps(BODY)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        while time.monotonic() < deadline:
            conn.request("PUT", "/platform/lease", payload, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            count[i] += 1

    threads = [threading.Thread(target=run, args=(i, k)) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put(sum(count))


def load(port: int, keys: list[str], seconds: float, processes: int = 2) -> float:
    queue = multiprocessing.Queue()
    chunks = [keys[i::processes] for i in range(processes)]
    procs = [multiprocessing.Process(target=_client_process, args=(port, chunk, seconds, queue))
             for chunk in chunks]
    for p in procs:
        p.start()
    total = sum(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--agents", type=int, default=32, help="concurrent simulated agents")
    parser.add_argument("--threads", type=int, default=16, help="gunicorn threads per server")
    args = parser.parse_args()
    gunicorn = ["--workers", "1", "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        children = [start_redis(redis_port, tmp / "redis.log")]
        try:
            port = free_port()
            env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'db.sqlite'}",
                       EXPLOOP_REDIS_URL=redis_url)
            api = Child("api", [script("exploop"), "api", "--port", str(port), *gunicorn,
                                "--log-level", "warning"], env=env, log_path=tmp / "api.log")
            children.append(api)
            wait_http(f"http://127.0.0.1:{port}/health", 30, api)
            admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
            h = {"Authorization": f"Bearer {admin}"}
            keys = []
            for i in range(args.agents):
                reply = requests.post(f"http://127.0.0.1:{port}/admin/v1/agents", headers=h, json={
                    "name": f"agent-{i}", "region": "bench", "capabilities": ["sast"], "max_jobs": 5})
                reply.raise_for_status()
                keys.append(reply.json()["api_key"])
            load(port, keys, 1)  # warm up
            ours = load(port, keys, args.seconds)
            api.stop()

            bare_port = free_port()
            bare = Child("bare", [sys.executable, "-m", "gunicorn", "-k", "gthread", "--threads", str(args.threads),
                                  "-w", "1", "-b", f"127.0.0.1:{bare_port}", "--log-level", "warning",
                                  "--chdir", str(ROOT / "bench"), "bare_lease_app:app"],
                         env=dict(os.environ, BENCH_REDIS_URL=redis_url), log_path=tmp / "bare.log")
            children.append(bare)
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.put(f"http://127.0.0.1:{bare_port}/platform/lease", json=BODY,
                                 headers={"Authorization": "Bearer ragent_x"}, timeout=2)
                    break
                except requests.RequestException as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(bare.output()) from exc
                    time.sleep(0.1)
            load(bare_port, keys, 1)
            baseline = load(bare_port, keys, args.seconds)
        finally:
            for child in reversed(children):
                child.stop(timeout=10)
    print(f"simulated agents: {args.agents}, gunicorn: 1 process x {args.threads} threads, {args.seconds:.0f}s each")
    print(f"bare Flask SET EX:   {baseline:8.1f} renewals/s")
    print(f"Exploop /platform/lease: {ours:8.1f} renewals/s")
    print(f"ratio (Exploop / bare): {ours / baseline:.2f}  (target >= 0.8)")
    print(f"agents one API process carries at a 30s heartbeat: ~{int(ours * 30):,}"
          f" (bare endpoint: ~{int(baseline * 30):,})")


if __name__ == "__main__":
    main()
