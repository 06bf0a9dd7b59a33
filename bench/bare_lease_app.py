"""Baseline for bench/leases.py: a bare Flask endpoint doing the lease's `SET ... EX` on Redis."""
import json
import os
import time

import redis
from flask import Flask, request

app = Flask(__name__)
client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@app.put("/platform/lease")
def renew():
    body = request.get_json()
    name = request.headers["Authorization"].rpartition("_")[2]
    client.set(f"bench:lease:{name}", json.dumps(dict(body, renewed_at=time.time())),
               ex=int(3 * body["heartbeat_interval"]))
    return {"agent": name, "desired_state": "active", "lease_ttl": int(3 * body["heartbeat_interval"])}
