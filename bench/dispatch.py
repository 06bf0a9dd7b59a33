"""Dispatch overhead: no-op scan jobs end to end versus raw Celery no-op tasks.

Exploop path: REST submit -> DB commit -> publish -> agent (Celery worker) ->
claim over HTTP -> no-op scan (EXPLOOP_SIMULATED_SCAN=0) -> complete over HTTP -> DB.
Baseline: `send_task` of a no-op task to a bare Celery worker with the same
settings (acks_late, prefetch 1, prefork, same concurrency) on the same Redis.
Prints jobs/s of each, their ratio, and submit->running latency p50/p99 next to
the raw publish->run latency.

    python bench/dispatch.py [--jobs 300] [--concurrency 4] [--database-url postgresql://...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exploop.celery_app import make_celery  # noqa: E402
from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402


def _dt(value) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def bench_exploop(tmp: Path, redis_url: str, jobs: int, concurrency: int, database_url: str | None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    database_url = database_url or f"sqlite:///{tmp / 'exploop.db'}"
    if database_url.startswith("postgresql"):
        from sqlalchemy import create_engine, text
        with create_engine(database_url).begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=database_url,
               EXPLOOP_REDIS_URL=redis_url, EXPLOOP_REGIONS="bench",
               EXPLOOP_PLANS='{"bench": {"max_concurrent": 100000, "max_queue": 100000}}',
               EXPLOOP_DEFAULT_PLAN="bench")
    api = Child("api", [script("exploop"), "api", "--port", str(port), "--workers", os.environ.get("BENCH_API_WORKERS", "2"),
                        "--threads", "16", "--log-level", "warning"], env=env, log_path=tmp / "api.log")
    agent = None
    try:
        wait_http(url + "/health", 30, api)
        admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                               capture_output=True, text=True).stdout.strip()
        h = {"Authorization": f"Bearer {admin}"}
        tenant = requests.post(url + "/admin/v1/tenants", json={"name": "bench"}, headers=h).json()["api_key"]
        token = requests.post(url + "/admin/v1/tokens", json={"max_uses": 1}, headers=h).json()["token"]
        agent = Child("agent", [script("exploop-agent")], log_path=tmp / "agent.log", env=dict(
            os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION="bench", CAPABILITIES="secrets",
            MAX_CONCURRENT_JOBS=str(concurrency), HEARTBEAT_INTERVAL="5s", LOG_LEVEL="warn", METRICS_PORT="off",
            HOME=str(tmp / "agent-home"), EXPLOOP_SIMULATED_SCAN="0"))
        deadline = time.monotonic() + 60
        while not any(a["status"] == "online" for a in requests.get(url + "/admin/v1/agents", headers=h).json()["items"]):
            if time.monotonic() > deadline or not agent.alive():
                raise RuntimeError("agent did not come online:\n" + agent.output()[-2000:])
            time.sleep(0.2)
        session = requests.Session()
        th = {"Authorization": f"Bearer {tenant}"}
        body = {"repo_url": "https://example.invalid/bench.git", "capability": "secrets", "region": "bench"}

        def submit(_):
            reply = session.post(url + "/api/v1/jobs", json=body, headers=th, timeout=30)
            reply.raise_for_status()

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(jobs)))
        while True:
            done = requests.get(url + "/admin/v1/jobs", params={"status": "completed", "per_page": 1},
                                headers=h).json()["total"]
            if done >= jobs:
                break
            if time.monotonic() - started > 600:
                raise RuntimeError(f"only {done}/{jobs} jobs completed")
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        from sqlalchemy import create_engine, text
        with create_engine(database_url).connect() as conn:
            rows = conn.execute(text("SELECT created_at, started_at FROM jobs")).all()
        latency = [(_dt(s) - _dt(c)).total_seconds() for c, s in rows]
        return {"rate": jobs / elapsed, "elapsed": elapsed, "latency": latency}
    finally:
        if agent:
            agent.stop()
        api.stop()


def bench_raw(tmp: Path, redis_url: str, jobs: int, concurrency: int) -> dict:
    env = dict(os.environ, BENCH_BROKER_URL=redis_url, PYTHONPATH=str(ROOT / "bench") + os.pathsep + str(ROOT))
    worker = Child("raw-worker", [sys.executable, "-m", "celery", "-A", "raw_celery", "worker", "-Q", "bench.raw",
                                  "-c", str(concurrency), "-P", "prefork", "-O", "fair", "--without-mingle",
                                  "--without-gossip", "-l", "warning", "-n", "raw@bench"],
                   env=env, log_path=tmp / "raw.log")
    client = redis.Redis.from_url(redis_url)
    try:
        app = make_celery(redis_url, queues=["bench.raw"])
        app.conf.task_routes = None
        app.send_task("bench.noop", args=[time.time()], queue="bench.raw")  # warm up the worker
        deadline = time.monotonic() + 60
        while client.llen("bench:raw:latency") < 1:
            if time.monotonic() > deadline or not worker.alive():
                raise RuntimeError("raw worker did not start:\n" + worker.output()[-2000:])
            time.sleep(0.1)
        client.delete("bench:raw:latency")
        started = time.monotonic()
        with app.producer_pool.acquire(block=True):
            pass

        def send(_):
            app.send_task("bench.noop", args=[time.time()], queue="bench.raw")

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, range(jobs)))
        while client.llen("bench:raw:latency") < jobs:
            if time.monotonic() - started > 600:
                raise RuntimeError("raw tasks did not finish")
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        latency = [float(v) for v in client.lrange("bench:raw:latency", 0, -1)]
        return {"rate": jobs / elapsed, "elapsed": elapsed, "latency": latency}
    finally:
        worker.stop()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--database-url", help="e.g. postgresql://postgres@127.0.0.1/test (default: SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        server = start_redis(port, tmp / "redis.log")
        redis_url = f"redis://127.0.0.1:{port}/0"
        try:
            raw = bench_raw(tmp, redis_url, args.jobs, args.concurrency)
            ours = bench_exploop(tmp, redis_url, args.jobs, args.concurrency, args.database_url)
        finally:
            server.stop()
    ms = lambda seconds: f"{seconds * 1000:.1f} ms"  # noqa: E731
    print(f"jobs: {args.jobs}, agent concurrency: {args.concurrency},"
          f" database: {(args.database_url or 'sqlite').split(':')[0]}")
    print(f"raw Celery no-op:      {raw['rate']:8.1f} tasks/s  publish->run p50 {ms(pct(raw['latency'], .5))}"
          f"  p99 {ms(pct(raw['latency'], .99))}")
    print(f"Exploop no-op jobs:    {ours['rate']:8.1f} jobs/s   submit->running p50 {ms(pct(ours['latency'], .5))}"
          f"  p99 {ms(pct(ours['latency'], .99))}")
    print(f"throughput ratio (Exploop / raw Celery): {ours['rate'] / raw['rate']:.2f}  (target >= 0.3, goal 0.5)")
    print(f"latency p50 ratio: {statistics.median(ours['latency']) / statistics.median(raw['latency']):.1f}x")


if __name__ == "__main__":
    main()
