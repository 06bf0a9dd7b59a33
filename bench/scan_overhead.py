"""Platform overhead of a scan job: a job on a generated Python repository versus the same
scanner run directly on the same checkout, per capability, for a large (~25k lines) and a
small (~1.5k lines) repository; and the checkout alone, fresh versus a rescan of the
unchanged large repository from the agent's mirror cache.

    python bench/scan_overhead.py [--lines 25000] [--small-lines 1500] [--runs 3] [--osv-dir ../shared/osv]

Starts a private redis-server, the API and one exploop-agent (all on loopback), submits
each capability's job ``--runs`` times and prints medians:

  direct    ``python -m workers.scanners.<cap> <checkout>`` (same options, environment
            and memory limit as the agent uses), on a checkout of the same commit
  agent     claim -> checkout -> scan -> report, as the agent measures it (summary)
  job       POST /api/v1/jobs -> the agent's "job completed" log line (queueing, claim,
            checkout, scan, upload of findings; read from the log, so the benchmark need not
            poll the API hard: on two cores a 10 Hz poller slows a scan by ~40%)

and the ratios agent/direct and job/direct of the medians, and of the fastest runs
(best-of, the least disturbed by other load on the host); targets: large <= 1.1, small
<= 1.3. Every job after the first of a repository is a rescan: its checkout comes from the
agent's mirror cache (MIRROR_CACHE_DIR), as in production.

  checkout  ``Workspace.checkout`` of the large repository (shallow and full history):
            fresh (empty mirror cache), rescan (warm cache, unchanged repository) and
            without a cache; target rescan/fresh <= 0.2.

Benchmarks print; tests never assert timings. semgrep runs when it is installed (or
SEMGREP_BIN is set).
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
from datetime import datetime
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exploop.config import ScannerSettings  # noqa: E402
from exploop.run.children import Child, free_port, script, start_redis, wait_http  # noqa: E402
from workers.mirror import MirrorCache  # noqa: E402
from workers.tasks import NEEDS_HISTORY, SCANNERS, _scanner_args  # noqa: E402
from workers.workspace import Workspace, minimal_env, run_process  # noqa: E402

MODULE = '''"""Generated module {n}: request handlers, storage helpers and a few risky calls."""
import hashlib
import json
import os
import subprocess

SETTINGS = {{"retries": 3, "timeout": 30, "name": "service-{n}"}}


class Store{n}:
    """A small key-value store backed by a database cursor."""

    def __init__(self, cursor):
        self.cursor = cursor
        self.cache = {{}}

    def get(self, key):
        if key in self.cache:
            return self.cache[key]
        self.cursor.execute("SELECT value FROM kv WHERE key = %s", (key,))
        row = self.cursor.fetchone()
        value = json.loads(row[0]) if row else None
        self.cache[key] = value
        return value

    def put(self, key, value):
        self.cache[key] = value
        self.cursor.execute("INSERT INTO kv (key, value) VALUES (%s, %s)", (key, json.dumps(value)))

'''
HANDLER = '''
def handler_{n}_{i}(request, store):
    """Handle request kind {i} of service {n}."""
    name = request.get("name", "")
    total = 0
    for step in range(SETTINGS["retries"]):
        total += step * {i}
        if total > 1000:
            break
    digest = hashlib.sha256(name.encode()).hexdigest()
    store.put(digest, {{"name": name, "total": total}})
    if request.get("debug"):
        print("handled", name, total)
    return {{"name": name, "total": total, "digest": digest}}

'''
RISKY = '''
def run_tool_{n}(command):
    """Run an external tool (shell=True: flagged by design)."""
    return subprocess.call(command, shell=True)


def legacy_digest_{n}(data):
    return hashlib.md5(data).hexdigest()
'''


def generate_repo(path: Path, lines: int) -> tuple[str, int]:
    """A git repository of generated Python (about ``lines`` lines), a requirements.txt with
    known-vulnerable pins, and a key planted in an early commit; returns (url, lines)."""
    path.mkdir(parents=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@example.com")

    def git(*args):
        subprocess.run(["git", *args], cwd=path, env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    (path / "config.py").write_text('AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"\n')
    git("add", "-A")
    git("commit", "-q", "-m", "initial")
    (path / "config.py").write_text('import os\nAWS_ACCESS_KEY_ID = os.environ["AWS_ACCESS_KEY_ID"]\n')
    (path / "requirements.txt").write_text(
        "Jinja2==2.10\nrequests==2.19.1\nDjango==3.2.0\nPyYAML==5.3\nflask==2.0.1\nurllib3==1.24.1\n")
    total, n = 0, 0
    while total < lines:
        text = MODULE.format(n=n) + "".join(HANDLER.format(n=n, i=i) for i in range(12)) + RISKY.format(n=n)
        target = path / f"service{n // 20}" / f"module_{n}.py"
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        total += text.count("\n")
        n += 1
    git("add", "-A")
    git("commit", "-q", "-m", "services")
    return f"file://{path}", total


class Platform:
    """redis-server, the API and one agent, all owned by this process."""

    def __init__(self, work: Path, agent_env: dict):
        self.work = work
        self.redis = start_redis(free_port(), work / "redis.log")
        redis_url = f"redis://127.0.0.1:{self.redis.cmd[self.redis.cmd.index('--port') + 1]}/0"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{work / 'exploop.db'}",
                        EXPLOOP_REDIS_URL=redis_url, EXPLOOP_ALLOW_LOCAL_REPOS="true",
                        EXPLOOP_REGIONS="us-east-1", EXPLOOP_JOB_TIME_LIMIT="30m")
        self.api = Child("api", [script("exploop"), "api", "--port", str(port), "--workers", "1",
                                 "--threads", "8", "--log-level", "warning"], env=self.env,
                         log_path=work / "api.log")
        wait_http(self.url + "/health", 30, self.api)
        admin = subprocess.run([script("exploop"), "create-admin-token", "--name", "bench"], env=self.env,
                               capture_output=True, text=True, check=True).stdout.strip()
        self.admin = {"Authorization": f"Bearer {admin}"}
        token = requests.post(self.url + "/admin/v1/tokens", headers=self.admin, timeout=10,
                              json={"max_uses": 1, "expires": "1h"}).json()["token"]
        self.tenant = {"Authorization": "Bearer " + requests.post(
            self.url + "/admin/v1/tenants", headers=self.admin, json={"name": "bench"}, timeout=10).json()["api_key"]}
        home = work / "agent-home"
        home.mkdir()
        self.agent = Child("agent", [script("exploop-agent")], log_path=work / "agent.log", env=dict(
            os.environ, API_URL=self.url, HOME=str(home), BOOTSTRAP_TOKEN=token, REGION="us-east-1",
            CAPABILITIES="sast,sca,secrets", MAX_CONCURRENT_JOBS="1", HEARTBEAT_INTERVAL="5s",
            LOG_LEVEL="info", **agent_env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agents = requests.get(self.url + "/admin/v1/agents", headers=self.admin, timeout=10).json()["items"]
            if any(a["status"] == "online" for a in agents):
                break
            if not self.agent.alive():
                raise RuntimeError("agent exited:\n" + self.agent.output()[-2000:])
            time.sleep(0.1)
        else:
            raise RuntimeError("agent did not come online")

    def run_job(self, repo: str, capability: str) -> tuple[float, dict]:
        """Submit a job; return (submit -> "job completed" in the agent log, the job)."""
        submitted = time.time()
        reply = requests.post(self.url + "/api/v1/jobs", headers=self.tenant, timeout=10, json={
            "repo_url": repo, "ref": "main", "capability": capability, "region": "us-east-1"})
        reply.raise_for_status()
        job_id = reply.json()["id"]
        # Poll slowly: on two cores a tight polling loop slows the scan it is timing.
        while True:
            time.sleep(1)
            job = requests.get(f"{self.url}/api/v1/jobs/{job_id}", headers=self.tenant, timeout=10).json()
            if job["status"] in ("completed", "failed"):
                break
        if job["status"] != "completed":
            raise RuntimeError(f"{capability} job failed: {job['error']}")
        for line in self.agent.output().splitlines():
            if "job completed" in line and f"job_id={job_id}" in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return stamp - submitted, job
        raise RuntimeError(f"no 'job completed' line for {job_id} in the agent log")

    def stop(self) -> None:
        for child in (self.agent, self.api, self.redis):
            child.stop()


def run_direct(repo: str, capability: str, settings: ScannerSettings, work: Path, tag: str = "") -> float:
    """The scanner alone on a checkout of the same commit, as the agent runs it."""
    checkout = work / f"direct-{tag}{capability}"
    if not checkout.exists():
        depth = [] if capability in NEEDS_HISTORY else ["--depth", "1"]
        subprocess.run(["git", "clone", "-q", *depth, repo, str(checkout)], check=True)
    home = work / "direct-home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = dict(minimal_env(str(home), str(home / "tmp")), PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    run_process([sys.executable, "-m", SCANNERS[capability], str(checkout),
                 *_scanner_args(capability, settings)], cwd=str(work), env=env,
                deadline=time.monotonic() + 1800, what=f"scanner {capability}",
                memory_limit=settings.memory_limit)
    return time.perf_counter() - started


def time_checkouts(repo: str, work: Path, runs: int) -> None:
    """Checkout alone: fresh (empty cache), rescan (warm cache, unchanged), no cache."""
    print(f"\n{'checkout (large)':<18} {'fresh':>8} {'rescan':>8} {'no cache':>9} {'rescan/fresh':>13} "
          f"{'rescan/no cache':>16}")
    for history in (False, True):
        times: dict[str, list[float]] = {"fresh": [], "rescan": [], "none": []}
        for n in range(runs):
            cache_dir = work / f"cache-{history}-{n}"
            for kind, cache in (("fresh", MirrorCache(cache_dir, 1 << 40)),
                                ("rescan", MirrorCache(cache_dir, 1 << 40)), ("none", None)):
                with Workspace("bench", time.monotonic() + 600, str(work), mirrors=cache) as ws:
                    started = time.perf_counter()
                    ws.checkout(repo, "main", history=history)
                    times[kind].append(time.perf_counter() - started)
            shutil.rmtree(cache_dir, ignore_errors=True)
        f, r, n_ = (statistics.median(times[k]) for k in ("fresh", "rescan", "none"))
        label = "full history" if history else "shallow"
        print(f"{label:<18} {f:8.3f} {r:8.3f} {n_:9.3f} {r / f:13.2f} {r / n_:16.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=25_000)
    parser.add_argument("--small-lines", type=int, default=1_500)
    parser.add_argument("--checkout-only", action="store_true", help="only time the checkouts")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--osv-dir", default=str(ROOT.parent / "shared" / "osv"),
                        help="directory with PyPI/all.zip (copied into a private OSV_DB_DIR)")
    parser.add_argument("--capability", action="append", choices=sorted(SCANNERS),
                        help="limit to these capabilities (default: all)")
    args = parser.parse_args()
    capabilities = args.capability or ["sast", "secrets", "sca"]
    work = Path(tempfile.mkdtemp(prefix="exploop-bench-"))
    platform = None
    try:
        repos = [("large", *generate_repo(work / "repo", args.lines)),
                 ("small", *generate_repo(work / "small", args.small_lines))]
        agent_env = {"MIRROR_CACHE_DIR": str(work / "mirrors")}
        if "sca" in capabilities:
            source = Path(args.osv_dir) / "PyPI" / "all.zip"
            if not source.is_file():
                print(f"no {source}: skipping sca", file=sys.stderr)
                capabilities.remove("sca")
            else:
                (work / "osv" / "PyPI").mkdir(parents=True)
                shutil.copy(source, work / "osv" / "PyPI" / "all.zip")
                agent_env["OSV_DB_DIR"] = str(work / "osv")
        settings = ScannerSettings.from_env(dict(os.environ, **agent_env))
        for name, _, lines in repos:
            folder = work / ("repo" if name == "large" else name)
            print(f"{name} repository: {lines} lines of Python in {sum(1 for _ in folder.rglob('*.py'))} files")
        print(f"{args.runs} runs each; medians in seconds")
        if args.checkout_only:
            time_checkouts(repos[0][1], work, args.runs)
            return 0
        platform = Platform(work, agent_env)
        print(f"{'repo':<6} {'capability':<10} {'direct':>8} {'agent':>8} {'checkout':>9} {'job':>8} "
              f"{'agent/direct':>13} {'job/direct':>11} {'best-of job/direct':>19}  engines")
        for name, repo, _ in repos:
            for capability in capabilities:
                # Warm caches once, as the agent's first job of a repository does (it fills the mirror).
                run_direct(repo, capability, settings, work, name)
                platform.run_job(repo, capability)
                direct, agent, checkout, job_times, engines = [], [], [], [], ""
                for _ in range(args.runs):
                    direct.append(run_direct(repo, capability, settings, work, name))
                    elapsed, job = platform.run_job(repo, capability)
                    job_times.append(elapsed)
                    agent.append(job["summary"]["duration_seconds"])
                    checkout.append(job["summary"]["checkout_seconds"])
                    engines = ",".join(f"{e['name']} {e['version']}" for e in job["summary"]["engines"])
                d, a, c, j = (statistics.median(x) for x in (direct, agent, checkout, job_times))
                best = min(job_times) / min(direct)  # least disturbed by other load on the host
                print(f"{name:<6} {capability:<10} {d:8.2f} {a:8.2f} {c:9.3f} {j:8.2f} {a / d:13.2f} {j / d:11.2f}"
                      f" {best:19.2f}  {engines}")
        platform.stop()
        platform = None
        time_checkouts(repos[0][1], work, args.runs)
    finally:
        if platform is not None:
            platform.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
