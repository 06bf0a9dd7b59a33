"""Benchmark ``exploop-admin get agents`` on a fleet of 10,000 agents, and job lists of 100,000 jobs.

Starts a private redis-server and a real API process (``exploop api``) on a fresh
SQLite database (or ``EXPLOOP_BENCH_DATABASE_URL``, emptied first), inserts the
agent rows and a lease for most of them, then prints:

* the API's own time for ``GET /admin/v1/agents`` (its ``Server-Timing`` header:
  auth, one paged query, one pipelined Redis read for the page's leases, JSON),
  for one page and for walking every page, next to what the client observed;
* the wall time of the CLI itself (``exploop-admin get agents``, all rows);
* ``GET /api/v1/jobs`` and ``GET /admin/v1/jobs`` pages of 500 with ``--jobs`` jobs (a big
  tenant's import: most queued on 12 queues, some pending, some done), each job with
  its ``queue_position`` (computed for the whole page in a few grouped statements).

It prints numbers and asserts nothing; the target is <= 100 ms server side per request.

    .venv/bin/python bench/get_agents.py [--agents 10000] [--jobs 100000] [--per-page 500] [--repeat 20]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from sqlalchemy import insert

from exploop.api.app import create_app, init_db
from exploop.core.extensions import db
from exploop.core.leases import LeaseStore
from exploop.core.models import AdminToken, Agent, Job, Tenant, utcnow
from exploop.core.security import ADMIN_PREFIX, TENANT_PREFIX, hash_token, new_token
from exploop.run.children import Child, free_port, script, start_redis, wait_http

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-south-1")


def _empty_database(url: str) -> None:
    if url.startswith("sqlite"):
        return
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


def _settle(url: str) -> None:
    """Refresh the planner's statistics after the bulk insert, as PostgreSQL's autovacuum does
    within about a minute of one (without them it guesses a tenant holds a few dozen jobs and
    sorts all 100,000 for a page); SQLite gets ``ANALYZE`` for the same reason."""
    from sqlalchemy import create_engine, text
    engine = create_engine(url, isolation_level="AUTOCOMMIT") if not url.startswith("sqlite") else create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ANALYZE" if url.startswith("sqlite") else "VACUUM ANALYZE"))
    engine.dispose()


def populate(database_url: str, redis_url: str, count: int, online_share: float) -> str:
    """Insert ``count`` agents and leases for ``online_share`` of them; return an admin token."""
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "REDIS_URL": redis_url})
    init_db(app)
    rng = random.Random(5)
    now = utcnow()
    rows = [{"name": f"agent-{REGIONS[i % len(REGIONS)]}-{i:05d}", "region": REGIONS[i % len(REGIONS)],
             "capabilities": "sast,sca,secrets", "max_jobs": 10, "key_hash": hash_token(f"bench-{i}"),
             "desired_state": "draining" if i % 50 == 0 else "active", "disabled": False,
             "version": "0.1.0", "host": f"host-{i:05d}", "last_seen": now, "created_at": now}
            for i in range(count)]
    token = new_token(ADMIN_PREFIX)
    with app.app_context():
        for start in range(0, count, 2000):
            db.session.execute(insert(Agent), rows[start:start + 2000])
        db.session.add(AdminToken(name="bench", role="admin", token_hash=hash_token(token)))
        db.session.commit()
        db.session.remove()
        db.engine.dispose()
    client = app.extensions["redis"]
    pipe = client.pipeline(transaction=False)
    for row in rows:
        if rng.random() < online_share:
            jobs = rng.randint(0, 10)
            body = {"status": "active", "running_jobs": [f"job-{row['name']}-{n}" for n in range(jobs)],
                    "jobs_running": jobs, "max_jobs": 10, "version": "0.1.0", "host": row["host"],
                    "nodename": f"{row['name']}@{row['host']}", "heartbeat_interval": 30,
                    "renewed_at": time.time()}
            pipe.set(LeaseStore.key(row["name"]), json.dumps(body), ex=900)
    pipe.execute()
    client.close()
    return token


def populate_jobs(database_url: str, redis_url: str, count: int) -> str:
    """Insert ``count`` jobs of one tenant: 70% queued, 20% pending, 10% completed; return its key."""
    import uuid
    from datetime import timedelta
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "REDIS_URL": redis_url})
    key = new_token(TENANT_PREFIX)
    start = utcnow() - timedelta(hours=3)
    with app.app_context():
        tenant = Tenant(name="big-import", key_hash=hash_token(key), plan="enterprise")
        db.session.add(tenant)
        db.session.commit()
        rows = []
        for i in range(count):
            at = start + timedelta(milliseconds=100 * i)
            status = "pending" if i % 10 in (3, 7) else "completed" if i % 10 == 5 else "queued"
            rows.append({"id": uuid.uuid4().hex, "tenant_id": tenant.id,
                         "capability": ("sast", "sca", "secrets")[i % 3],
                         "region": REGIONS[(i // 3) % 4], "repo_url": f"https://example.com/r{i}.git", "ref": "HEAD",
                         "status": status, "priority": "normal", "admission_key": at, "attempt": 1,
                         "max_attempts": 3, "time_limit": 1800, "progress": 0, "created_at": at,
                         "queued_at": at if status != "pending" else None,
                         "finished_at": at if status == "completed" else None})
            if len(rows) == 5000:
                db.session.execute(insert(Job), rows)
                rows = []
        if rows:
            db.session.execute(insert(Job), rows)
        db.session.commit()
        db.session.remove()
        db.engine.dispose()
    app.extensions["redis"].close()
    return key


def _server_ms(response: requests.Response) -> float:
    """``Server-Timing: app;dur=12.3`` -> 12.3"""
    header = response.headers.get("Server-Timing", "")
    for part in header.split(";"):
        if part.strip().startswith("dur="):
            return float(part.strip()[4:])
    raise RuntimeError(f"no Server-Timing header on {response.url}")


def percentile(values: list[float], q: float) -> float:
    """The value at quantile ``q`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"median {statistics.median(ordered):7.1f} ms   p95 {percentile(ordered, 0.95):7.1f} ms"
            f"   max {ordered[-1]:7.1f} ms   (n={len(ordered)})")


def measure_page(session: requests.Session, url: str, params: dict, repeat: int) -> tuple[list, list]:
    server, client = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        response = session.get(url, params=params, timeout=60)
        client.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        server.append(_server_ms(response))
    return server, client


def walk_pages(session: requests.Session, url: str, per_page: int) -> tuple[int, float, float, list]:
    """Fetch every page like the CLI does; return (items, server ms, wall ms, per-page server ms)."""
    page, items, per_page_server = 1, 0, []
    started = time.perf_counter()
    while True:
        response = session.get(url, params={"page": page, "per_page": per_page}, timeout=60)
        response.raise_for_status()
        per_page_server.append(_server_ms(response))
        body = response.json()
        items += len(body["items"])
        if not body["items"] or items >= body["total"]:
            break
        page += 1
    return items, sum(per_page_server), (time.perf_counter() - started) * 1000, per_page_server


def time_cli(env: dict, args: list[str], repeat: int) -> tuple[list[float], int]:
    walls, lines = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run([script("exploop-admin"), *args], env=env, capture_output=True, text=True)
        walls.append((time.perf_counter() - started) * 1000)
        if result.returncode != 0:
            raise RuntimeError(f"exploop-admin {' '.join(args)} failed: {result.stderr.strip()}")
        lines = result.stdout.count("\n")
    return walls, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--per-page", type=int, default=500, help="page size (the API allows 1-500)")
    parser.add_argument("--repeat", type=int, default=20, help="requests per single-page measurement")
    parser.add_argument("--cli-repeat", type=int, default=3)
    parser.add_argument("--online", type=float, default=0.9, help="share of agents with a lease")
    parser.add_argument("--workers", type=int, default=2, help="API worker processes")
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs for the job list pages (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp:
        tmp_path = Path(tmp)
        redis_port, api_port = free_port(), free_port()
        redis_child = start_redis(redis_port, tmp_path / "redis.log")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        database_url = os.environ.get("EXPLOOP_BENCH_DATABASE_URL") or f"sqlite:///{tmp_path / 'bench.db'}"
        _empty_database(database_url)
        api = None
        try:
            started = time.perf_counter()
            token = populate(database_url, redis_url, args.agents, args.online)
            tenant_key = populate_jobs(database_url, redis_url, args.jobs) if args.jobs else None
            _settle(database_url)
            print(f"setup: {args.agents} agents, {int(args.online * 100)}% with a lease, {args.jobs} jobs,"
                  f" {database_url.split(':')[0]} + redis, in {time.perf_counter() - started:.1f}s")
            env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=database_url,
                       EXPLOOP_REDIS_URL=redis_url, EXPLOOP_REGIONS=",".join(REGIONS))
            api = Child("api", [script("exploop"), "api", "--port", str(api_port), "--workers",
                                str(args.workers), "--log-level", "warning"],
                        env=env, log_path=tmp_path / "api.log")
            base = f"http://127.0.0.1:{api_port}"
            wait_http(base + "/health", 60, api)
            url = base + "/admin/v1/agents"
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"
            measure_page(session, url, {"per_page": args.per_page}, 3)  # warm both workers

            print("\nGET /admin/v1/agents  (server time = Server-Timing; client = round trip)")
            for label, params in ((f"first page, per_page={args.per_page}", {"per_page": args.per_page}),
                                  (f"last page, per_page={args.per_page}",
                                   {"per_page": args.per_page,
                                    "page": max(1, -(-args.agents // args.per_page))}),
                                  ("default page, per_page=50", {})):
                server, client = measure_page(session, url, params, args.repeat)
                print(f"  {label:32s} server {_stats(server)}")
                print(f"  {'':32s} client {_stats(client)}")

            walks = [walk_pages(session, url, args.per_page) for _ in range(3)]
            items, server_total, wall, pages = min(walks, key=lambda w: w[2])
            print(f"  all pages ({len(pages)} x {args.per_page}, best of 3)"
                  f"  server total {server_total:7.1f} ms   slowest page {max(pages):6.1f} ms"
                  f"   client wall {wall:7.1f} ms   ({items} agents)")

            server, client = measure_page(session, base + "/admin/v1/cluster-info", {}, 5)
            print(f"  {'GET /admin/v1/cluster-info':32s} server {_stats(server)}")

            if tenant_key:
                pages = -(-args.jobs // args.per_page)
                tenant_session = requests.Session()
                tenant_session.headers["Authorization"] = f"Bearer {tenant_key}"
                print(f"\njob lists, {args.jobs} jobs, per_page={args.per_page} (with queue_position)")
                for label, session_, path, params in (
                        ("GET /api/v1/jobs first page", tenant_session, "/api/v1/jobs", {}),
                        ("GET /api/v1/jobs middle page", tenant_session, "/api/v1/jobs", {"page": pages // 2}),
                        ("GET /api/v1/jobs?status=pending", tenant_session, "/api/v1/jobs", {"status": "pending"}),
                        ("GET /admin/v1/jobs first page", session, "/admin/v1/jobs", {}),
                        ("GET /admin/v1/jobs?status=queued", session, "/admin/v1/jobs", {"status": "queued"})):
                    server, client = measure_page(session_, base + path, {"per_page": args.per_page, **params},
                                                  args.repeat)
                    print(f"  {label:32s} server {_stats(server)}")

            cli_env = dict(os.environ, EXPLOOP_API_URL=base, EXPLOOP_ADMIN_TOKEN=token)
            print("\nexploop-admin (wall time, process start to exit)")
            for cli_args in (["get", "agents"], ["get", "agents", "-o", "json"], ["--help"]):
                walls, lines = time_cli(cli_env, cli_args, args.cli_repeat)
                print(f"  {' '.join(cli_args):32s} {_stats(walls)}   ({lines} lines)")
        finally:
            if api is not None:
                api.stop()
            redis_child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
