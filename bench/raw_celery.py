"""Baseline for bench/dispatch.py: a bare Celery no-op task with the agent's settings."""
import os
import time

import redis

from exploop.celery_app import make_celery

app = make_celery(os.environ["BENCH_BROKER_URL"], queues=["bench.raw"])
app.conf.task_routes = None
app.conf.task_default_queue = "bench.raw"
_redis = None


@app.task(name="bench.noop")
def noop(sent_at: float) -> None:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])
    _redis.rpush("bench:raw:latency", time.time() - sent_at)
