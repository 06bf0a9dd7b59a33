"""Idle agent memory: RSS of the whole agent (main process + prefork pool) at MAX_CONCURRENT_JOBS=5,
next to a bare Celery worker with the same pool size measured in the same run. Target <= 150 MB.

    python bench/agent_memory.py [--concurrency 5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over the process tree. RSS counts pages shared by the forked
    pool once per process; PSS splits them, so it is the memory the tree really holds."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    infos = [p.memory_full_info() for p in procs]
    return sum(i.rss for i in infos), sum(i.pss for i in infos)


def settle(pid: int, seconds: float = 5.0) -> tuple[int, int]:
    time.sleep(seconds)
    return tree_memory(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="exploop-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis_port, api_port = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        children = [start_redis(redis_port, tmp / "redis.log")]
        url = f"http://127.0.0.1:{api_port}"
        env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp / 'db.sqlite'}",
                   EXPLOOP_REDIS_URL=redis_url)
        try:
            api = Child("api", [script("exploop"), "api", "--port", str(api_port), "--workers", "1",
                                "--log-level", "warning"], env=env, log_path=tmp / "api.log")
            children.append(api)
            wait_http(url + "/health", 30, api)
            admin = subprocess.run([script("exploop"), "create-admin-token"], env=env, check=True,
                                   capture_output=True, text=True).stdout.strip()
            token = requests.post(url + "/admin/v1/tokens", json={},
                                  headers={"Authorization": f"Bearer {admin}"}).json()["token"]
            agent = Child("agent", [script("exploop-agent")], log_path=tmp / "agent.log", env=dict(
                os.environ, API_URL=url, BOOTSTRAP_TOKEN=token, REGION="bench",
                CAPABILITIES="sast,sca,secrets", MAX_CONCURRENT_JOBS=str(args.concurrency),
                HOME=str(tmp / "home"), LOG_LEVEL="warn", METRICS_PORT=str(free_port())))
            children.append(agent)
            agent_rss = settle(agent.pid)
            agent.stop()
            bare = Child("celery", [sys.executable, "-m", "celery", "-A", "raw_celery", "worker", "-Q", "bench.raw",
                                    "-c", str(args.concurrency), "-P", "prefork", "--without-mingle",
                                    "--without-gossip", "-l", "warning"],
                         env=dict(os.environ, BENCH_BROKER_URL=redis_url,
                                  PYTHONPATH=str(ROOT / "bench") + os.pathsep + str(ROOT)),
                         log_path=tmp / "celery.log")
            children.append(bare)
            bare_rss = settle(bare.pid)
        finally:
            for child in reversed(children):
                child.stop(timeout=10)
    mb = 1024 * 1024
    print(f"pool size: {args.concurrency} (+1 main process)")
    print(f"bare Celery worker:  RSS {bare_rss[0] / mb:7.1f} MB   PSS {bare_rss[1] / mb:7.1f} MB")
    print(f"idle exploop-agent:  RSS {agent_rss[0] / mb:7.1f} MB   PSS {agent_rss[1] / mb:7.1f} MB"
          "  (target <= 150 MB)")
    print(f"ratio (agent / bare Celery): RSS {agent_rss[0] / bare_rss[0]:.2f}  PSS {agent_rss[1] / bare_rss[1]:.2f}")


if __name__ == "__main__":
    main()
