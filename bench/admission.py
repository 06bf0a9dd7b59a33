"""Admission: throughput from a backlog of 10,000 pending jobs across 100 tenants, and the
worst wait of a low-priority job under a continuous stream of high-priority work.

Throughput is printed next to a baseline measured in the same run: publishing the same
number of messages with bare `send_task` (admission = DB update + publish per job).

    python bench/admission.py [--tenants 100] [--jobs-per-tenant 100] [--aging 1s]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert, select, update  # noqa: E402

from exploop.api.app import (
    create_app,  # noqa: E402
    init_db,  # noqa: E402
)
from exploop.config import parse_duration  # noqa: E402
from exploop.core.controller import Controller  # noqa: E402
from exploop.core.extensions import db  # noqa: E402
from exploop.core.jobs import admission_key, submit  # noqa: E402
from exploop.core.models import Job, Tenant, utcnow  # noqa: E402
from exploop.routing import RUN_SCAN  # noqa: E402
from exploop.run.children import free_port, start_redis  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--jobs-per-tenant", type=int, default=100)
    parser.add_argument("--aging", default="1s", help="PRIORITY_AGING for the starvation run")
    args = parser.parse_args()
    total = args.tenants * args.jobs_per_tenant
    aging = parse_duration(args.aging)
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        port = free_port()
        server = start_redis(port, Path(tmp_dir) / "redis.log")
        try:
            app = create_app({
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_dir}/db.sqlite",
                "REDIS_URL": f"redis://127.0.0.1:{port}/0", "REGIONS": "bench",
                "PRIORITY_AGING": args.aging,
                "PLANS": {"big": {"max_concurrent": args.jobs_per_tenant, "max_queue": 100000},
                          "small": {"max_concurrent": 5, "max_queue": 100000}},
                "DEFAULT_PLAN": "big"})
            init_db(app)
            with app.app_context():
                # --- throughput: everything pending, then the controller admits it all.
                tenants = [Tenant(name=f"t{i}", key_hash=f"h{i}", plan="big") for i in range(args.tenants)]
                db.session.add_all(tenants)
                db.session.commit()
                now = utcnow()
                rows = [dict(id=f"{t.id:04d}{n:06d}", tenant_id=t.id, capability="secrets", region="bench",
                             repo_url="https://x.invalid/r.git", ref="HEAD", status="pending", priority="normal",
                             admission_key=admission_key(now, "normal"), created_at=now, attempt=1,
                             max_attempts=3, time_limit=1800, progress=0)
                        for t in tenants for n in range(args.jobs_per_tenant)]
                db.session.execute(insert(Job), rows)
                db.session.commit()
                controller = Controller(app, interval=1)
                started = time.perf_counter()
                admitted = controller.admit_fairly()
                elapsed = time.perf_counter() - started
                assert admitted == total, (admitted, total)

                celery = app.extensions["celery"]
                started = time.perf_counter()
                for n in range(total):
                    celery.send_task(RUN_SCAN, kwargs={"job_id": f"raw{n}", "attempt": 1,
                                                       "capability": "secrets", "region": "bench"})
                raw = time.perf_counter() - started

                # --- starvation: one tenant, 5 slots, a stream of high jobs, some low jobs.
                busy = Tenant(name="busy", key_hash="busy", plan="small")
                db.session.add(busy)
                db.session.commit()
                body = {"repo_url": "https://x.invalid/r.git", "capability": "secrets", "region": "bench"}
                for _ in range(5):
                    submit(busy, dict(body, priority="high"), None)
                lows = {submit(busy, dict(body, priority="low"), None)[0].id: time.monotonic() for _ in range(5)}
                waits = {}
                deadline = time.monotonic() + 30 * aging
                while len(waits) < len(lows) and time.monotonic() < deadline:
                    for _ in range(5):  # the stream never stops: 5 new high jobs per round
                        submit(busy, dict(body, priority="high"), None)
                    queued = db.session.scalars(select(Job.id).where(Job.tenant_id == busy.id,
                                                                     Job.status == "queued")).all()
                    for job_id in queued:
                        if job_id in lows and job_id not in waits:
                            waits[job_id] = time.monotonic() - lows[job_id]
                    # agents finish everything queued; the freed slots are admitted by priority
                    db.session.execute(update(Job).where(Job.id.in_(queued)).values(
                        status="completed", finished_at=utcnow()))
                    db.session.commit()
                    controller.admit_fairly()
                    time.sleep(aging / 5)
        finally:
            server.stop()
    print(f"backlog: {total:,} pending jobs across {args.tenants} tenants")
    print(f"admission: {total / elapsed:8.0f} jobs/s  ({elapsed:.2f}s)")
    print(f"raw send_task baseline: {total / raw:8.0f} msgs/s  ({raw:.2f}s)")
    print(f"ratio (admission / raw publish): {raw / elapsed:.2f}")
    if len(waits) < len(lows):
        print(f"STARVED: {len(lows) - len(waits)} low-priority jobs not admitted within {30 * aging:.0f}s")
    else:
        print(f"low-priority jobs under a continuous high-priority stream (PRIORITY_AGING {aging:g}s):"
              f" worst wait {max(waits.values()):.2f}s (bound: 2 x aging + a round = {2 * aging + aging / 5:.2f}s"
              " plus admission time)")


if __name__ == "__main__":
    main()
