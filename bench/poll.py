"""Long-polls at scale: N concurrent ``POST /platform/poll`` held by the API, and pickup latency.

Runs a private Redis, the API (gunicorn, --server gthread or gevent), the controller, one
Celery agent (capability sca, simulated no-op scans) and N poller threads spread over
--agents HTTP agent keys (capability secrets: a separate queue, so each kind's latency is
its own). Once the N polls are held (counted by Redis as clients blocked in BRPOP), it
submits --jobs jobs alternating secrets/sca, one every --gap, and prints:

  held       polls blocked in BRPOP at once (server side) and how long reaching N took
  http recv  publish (job queued_at) -> the poller receives the handout
  http claim publish -> claimed (started_at), poller claims at once with its handout
  celery     publish -> claimed (started_at) by the Celery agent, same run

    python bench/poll.py [--polls 1000] [--agents 10] [--jobs 200] [--server gthread|gevent]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _epoch(value) -> float:
    """A naive-UTC database timestamp (datetime or SQLite's text) as epoch seconds."""
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


class Poller(threading.Thread):
    """One long-poll loop on its own kept-alive connection: poll, claim at once, poll again."""

    def __init__(self, port: int, key: str, timeout: float, received: dict, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.key, self.timeout = port, key, timeout
        self.received, self.stop_event = received, stop
        self.errors = 0
        self.last_error = None

    def _post(self, conn, path, body):
        data = json.dumps(body)
        conn.request("POST", path, data, {"Authorization": f"Bearer {self.key}",
                                          "Content-Type": "application/json"})
        response = conn.getresponse()
        payload = response.read()
        return response.status, payload

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout + 30)
        while not self.stop_event.is_set():
            try:
                status, payload = self._post(conn, "/platform/poll", {"timeout": self.timeout})
                if status != 200:
                    if status != 204:
                        self.errors += 1
                        self.last_error = f"HTTP {status}: {payload[:200]!r}"
                        time.sleep(0.5)
                    continue
                got = time.time()
                handout = json.loads(payload)
                self.received[handout["job_id"]] = got
                self._post(conn, f"/platform/jobs/{handout['job_id']}/claim",
                           {"attempt": handout["attempt"], "handout_id": handout["handout_id"]})
            except (OSError, http.client.HTTPException) as exc:
                self.errors += 1
                self.last_error = repr(exc)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout + 30)
                time.sleep(0.5)


def _tree_usage(pid: int) -> tuple[float, int]:
    """(RSS in MiB, OS threads) of a process and its children (the gunicorn workers)."""
    pids, rss, threads = [pid], 0, 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=10, help="HTTP agent keys the polls use")
    parser.add_argument("--jobs", type=int, default=200, help="jobs submitted (half HTTP, half Celery)")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between submissions")
    parser.add_argument("--server", choices=("gthread", "gevent"), default="gthread")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="gthread threads per worker (default: enough for every poll + 64)")
    parser.add_argument("--poll-timeout", type=float, default=30.0)
    args = parser.parse_args()
    threads = args.threads or min(1000, args.polls // args.workers + 64)

    with tempfile.TemporaryDirectory(prefix="exploop-bench-poll-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_port = free_port()
        redis_server = start_redis(redis_port, tmp / "redis.log")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'exploop.db'}",
                   EXPLOOP_REDIS_URL=redis_url, EXPLOOP_REGIONS="bench",
                   EXPLOOP_PLANS='{"bench": {"max_concurrent": 100000, "max_queue": 100000}}',
                   EXPLOOP_DEFAULT_PLAN="bench", EXPLOOP_MAX_POLL_TIMEOUT=f"{args.poll_timeout}s")
        if args.server == "gevent":
            env["GUNICORN_CMD_ARGS"] = "--worker-class gevent --worker-connections 4000"
        api = Child("api", [script("exploop"), "api", "--port", str(port), "--workers", str(args.workers),
                            "--threads", str(threads), "--log-level", "warning"],
                    env=env, log_path=tmp / "api.log")
        controller = agent = None
        stop = threading.Event()
        try:
            wait_http(url + "/health", 60, api)
            admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
            h = {"Authorization": f"Bearer {admin}"}
            tenant = requests.post(url + "/admin/v1/tenants", json={"name": "bench"}, headers=h).json()["api_key"]
            controller = Child("controller", [script("exploop"), "controller", "--interval", "1s"],
                               env=env, log_path=tmp / "controller.log")
            token = requests.post(url + "/admin/v1/tokens", json={"max_uses": 1}, headers=h).json()["token"]
            agent = Child("agent", [script("exploop-agent")], log_path=tmp / "agent.log", env=dict(
                os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION="bench", CAPABILITIES="sca",
                MAX_CONCURRENT_JOBS="4", HEARTBEAT_INTERVAL="5s", LOG_LEVEL="warn", METRICS_PORT="off",
                HOME=str(tmp / "agent-home"), AGENT_NAME="celery-bench", EXPLOOP_SIMULATED_SCAN="0"))
            keys = []
            for n in range(args.agents):
                reply = requests.post(url + "/admin/v1/agents", headers=h, json={
                    "name": f"http-{n}", "region": "bench", "capabilities": ["secrets"], "max_jobs": 1000})
                reply.raise_for_status()
                keys.append(reply.json()["api_key"])
            deadline = time.monotonic() + 60
            while not any(a["status"] == "online" for a in
                          requests.get(url + "/admin/v1/agents", headers=h).json()["items"]):
                if time.monotonic() > deadline or not agent.alive():
                    raise RuntimeError("celery agent did not come online:\n" + agent.output()[-2000:])
                time.sleep(0.2)

            rc = redis.Redis.from_url(redis_url)
            received: dict[str, float] = {}
            pollers = [Poller(port, keys[i % len(keys)], args.poll_timeout, received, stop)
                       for i in range(args.polls)]
            started = time.monotonic()
            for poller in pollers:
                poller.start()
            held_at = None
            peak = 0
            while time.monotonic() - started < 60:
                # The Celery agent's consumer blocks in BRPOP too: count only the polls.
                blocked = int(rc.info("clients")["blocked_clients"]) - 1
                peak = max(peak, blocked)
                if blocked >= args.polls:
                    held_at = time.monotonic() - started
                    break
                time.sleep(0.1)
            rss, os_threads = _tree_usage(api.proc.pid)
            print(f"server model: {args.server}, {args.workers} workers"
                  + (f" x {threads} threads" if args.server == "gthread" else ""))
            print(f"held: {peak} of {args.polls} polls blocked at once"
                  + (f", all held after {held_at:.1f}s" if held_at is not None else " (not all within 60s)")
                  + f"; API processes: {rss:.0f} MiB RSS, {os_threads} OS threads")

            # Other requests while the polls are held: a lease renewal must not wait for a thread.
            probe = requests.Session()
            probe.headers["Authorization"] = f"Bearer {keys[0]}"
            probe_times = []
            for _ in range(20):
                t0 = time.monotonic()
                probe.get(url + "/platform/config", timeout=60).raise_for_status()
                probe_times.append(time.monotonic() - t0)
            print(f"{'other request while polls held':40s} n={len(probe_times):4d} "
                  f"p50={pct(probe_times, 0.5) * 1000:7.1f} ms p99={pct(probe_times, 0.99) * 1000:7.1f} ms")

            session = requests.Session()
            th = {"Authorization": f"Bearer {tenant}"}
            ids = {"secrets": [], "sca": []}
            for n in range(args.jobs):
                capability = "secrets" if n % 2 == 0 else "sca"
                reply = session.post(url + "/api/v1/jobs", headers=th, timeout=30, json={
                    "repo_url": "https://example.invalid/bench.git", "capability": capability,
                    "region": "bench"})
                reply.raise_for_status()
                ids[capability].append(reply.json()["id"])
                time.sleep(args.gap)
            from sqlalchemy import create_engine, text
            engine = create_engine(env["EXPLOOP_SQLALCHEMY_DATABASE_URI"])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    views = {row[0]: row for row in conn.execute(text(
                        "SELECT id, queued_at, started_at FROM jobs"))}
                if all(v[2] is not None for v in views.values()) and len(views) == args.jobs:
                    break
                time.sleep(0.5)
            blocked_after = int(rc.info("clients")["blocked_clients"]) - 1

            def lat(job_ids, end):
                return [end(job_id) - _epoch(views[job_id][1]) for job_id in job_ids
                        if views[job_id][2] is not None and end(job_id) is not None]

            def recv(job_id):
                return received.get(job_id)

            def claimed(job_id):
                return _epoch(views[job_id][2])

            rows = [("http recv (publish -> poller has it)", lat(ids["secrets"], recv)),
                    ("http claim (publish -> claimed)", lat(ids["secrets"], claimed)),
                    ("celery (publish -> claimed)", lat(ids["sca"], claimed))]
            for label, values in rows:
                print(f"{label:40s} n={len(values):4d} p50={pct(values, 0.5) * 1000:7.1f} ms "
                      f"p99={pct(values, 0.99) * 1000:7.1f} ms")
            errors = sum(p.errors for p in pollers)
            print(f"polls still held after the jobs: {blocked_after}; poller errors: {errors}")
            samples = {p.last_error for p in pollers if p.last_error}
            if samples:
                print("sample errors:", "; ".join(sorted(samples)[:3]))
                print("api log tail:\n" + api.output()[-1500:])
        finally:
            stop.set()
            if agent:
                agent.stop()
            if controller:
                controller.stop()
            api.stop(timeout=5)
            redis_server.stop()


if __name__ == "__main__":
    main()
