"""``exploop up``: the whole stack on one machine, as child processes we own.

Redis (REDIS_URL if given, else a private ``redis-server`` on a free loopback
port), the API on SQLite under ``.exploop/``, the controller, one agent with
every capability, and Flower. It creates an admin token and a tenant (saved in
``.exploop/credentials.json``, mode 0600, since keys are shown only once),
prints how to use them, runs a demo scan, and stops every child on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import requests

from ..config import DEFAULT_KEY_FILE, agent_key_file, data_dir, local_stack_record
from .children import Child, free_port, script, start_redis, wait_http

__all__ = ["LocalStack"]

REGION = "local"
AGENT_NAME = "agent-local-1"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _echo(message: str = "") -> None:
    print(message, flush=True)


class LocalStack:
    def __init__(self, api_port: int = 8080, flower_port: int = 5555, demo: bool = True):
        self.api_port = api_port
        self.flower_port = flower_port
        self.demo = demo
        self.dir = data_dir().resolve()
        self.logs = self.dir / "logs"
        self.children: list[Child] = []
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.metrics_port = 9100 if _port_free(9100) else free_port()

    # --- lifecycle ----------------------------------------------------------------

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        stopping = []

        def on_signal(signum, frame):
            stopping.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_signal)
        try:
            self.start()
            self.wait()
        except KeyboardInterrupt:
            _echo("\nstopping...")
        except RuntimeError as exc:
            print(f"exploop up: {exc}", file=sys.stderr)
            self.stop()
            return 1
        self.stop()
        return 0

    def start(self) -> None:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            port = free_port()
            self.children.append(start_redis(port, self.logs / "redis.log"))
            redis_url = f"redis://127.0.0.1:{port}/0"
        env = dict(os.environ,
                   EXPLOOP_DATA_DIR=str(self.dir),
                   EXPLOOP_REDIS_URL=redis_url,
                   EXPLOOP_SQLALCHEMY_DATABASE_URI=f"sqlite:///{self.dir / 'exploop.db'}",
                   EXPLOOP_ALLOW_LOCAL_REPOS="true",
                   EXPLOOP_REGIONS=REGION)
        if not (os.environ.get("EXPLOOP_SECRET_KEY") or os.environ.get("EXPLOOP_SECRET_KEY_FILE")):
            env["EXPLOOP_SECRET_KEY_FILE"] = str(self._secret_key_file())
        self.env, self.redis_url = env, redis_url
        creds = self._credentials()
        api = self._spawn("api", [script("exploop"), "api", "--port", str(self.api_port),
                                  "--workers", "1", "--threads", "16"], env)
        wait_http(self.api_url + "/health", 30, api)
        self._spawn("controller", [script("exploop"), "controller", "--interval", "2s"], env)
        agent_home = self.dir / "agent"
        agent_env = dict(os.environ, API_URL=self.api_url, EXPLOOP_STATE_DIR=str(agent_home),
                         REGION=REGION, CAPABILITIES="sast,sca,secrets", MAX_CONCURRENT_JOBS="2",
                         AGENT_NAME=AGENT_NAME, METRICS_PORT=str(self.metrics_port))
        # Its key from an earlier run (agent.json: saved before keys were kept per name).
        if not agent_key_file(agent_home, AGENT_NAME).exists() and not (agent_home / DEFAULT_KEY_FILE).exists():
            agent_env["BOOTSTRAP_TOKEN"] = self._admin(creds, "POST", "/admin/v1/tokens",
                                                       {"max_uses": 1, "expires": "10m"})["token"]
        self._spawn("agent", [script("exploop-agent")], agent_env)
        self._spawn("flower", [script("celery"), "--broker", redis_url, "flower",
                               f"--port={self.flower_port}", "--address=127.0.0.1"],
                    dict(os.environ, FLOWER_UNAUTHENTICATED_API="true"))
        wait_http(f"http://127.0.0.1:{self.flower_port}/healthcheck", 30, self.children[-1])
        self._wait_agent(creds)
        self._record()
        self._sample_repo()  # the banner's curl scans it, with or without the demo
        self._banner(creds)
        if self.demo:
            self._demo(creds)

    def wait(self) -> None:
        while True:
            for child in self.children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode};"
                                       f" see {child.log_path}")
            time.sleep(1)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=30)
        self.children.clear()

    # --- helpers ------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict) -> Child:
        child = Child(name, cmd, env=env, log_path=self.logs / f"{name}.log")
        self.children.append(child)
        return child

    def _secret_key_file(self) -> Path:
        """The local stack's server key (made once, mode 0600), beside its database."""
        from ..core.keyring import generate_key
        path = self.dir / "secret.key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key() + "\n")
        return path

    def _credentials(self) -> dict:
        """The local admin token and demo tenant key, created once and kept 0600."""
        path = self.dir / "credentials.json"
        if path.exists():
            return json.loads(path.read_text())
        subprocess.run([script("exploop"), "init-db"], env=self.env, check=True, capture_output=True)
        admin = subprocess.run([script("exploop"), "create-admin-token", "--name", "local-admin"],
                               env=self.env, check=True, capture_output=True, text=True).stdout.strip()
        creds = {"admin_token": admin}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(creds, handle)
        return creds

    def _admin(self, creds: dict, method: str, path: str, body: dict | None = None) -> dict:
        reply = requests.request(method, self.api_url + path, json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {creds['admin_token']}"})
        if reply.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {reply.status_code} {reply.text}")
        return reply.json()

    def _tenant_key(self, creds: dict) -> str:
        if "tenant_key" not in creds:
            creds["tenant_key"] = self._admin(creds, "POST", "/admin/v1/tenants", {"name": "demo"})["api_key"]
            path = self.dir / "credentials.json"
            path.write_text(json.dumps(creds))
        return creds["tenant_key"]

    def _wait_agent(self, creds: dict, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            agents = self._admin(creds, "GET", "/admin/v1/agents")["items"]
            if any(a["status"] == "online" for a in agents):
                return
            for child in self.children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited; see {child.log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"the agent did not come online; see {self.logs / 'agent.log'}")

    def _record(self) -> None:
        """Say where this stack keeps its database, so ``exploop create-admin-token`` run from
        any directory finds it (``~/.exploop/local-stack.json``)."""
        path = local_stack_record()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(json.dumps({"data_dir": str(self.dir), "api_url": self.api_url}))

    def _banner(self, creds: dict) -> None:
        tenant = self._tenant_key(creds)
        bin_dir = Path(sys.executable).parent
        body = json.dumps({"repo_url": f"file://{self.dir / 'sample-repo'}", "capability": "secrets"})
        _echo(f"""
Exploop is running (Ctrl-C stops everything; logs in {self.logs})

  API       {self.api_url}      (health: {self.api_url}/health, OpenAPI: {self.api_url}/openapi.json)
  Console   {self.api_url}/ui/      (sign in with the admin token below)
  Flower    http://127.0.0.1:{self.flower_port}
  Redis     {self.redis_url}
  Agent     {AGENT_NAME}, region {REGION}, capabilities sast,sca,secrets
            metrics: http://127.0.0.1:{self.metrics_port}/metrics (API: {self.api_url}/metrics)
  Database  {self.dir / 'exploop.db'}

In another shell (the commands are in {bin_dir}):
  export PATH="{bin_dir}:$PATH"
  export API={self.api_url} TENANT_KEY={tenant}
  export EXPLOOP_API_URL={self.api_url} EXPLOOP_ADMIN_TOKEN={creds['admin_token']}

Admin CLI:
  exploop-admin get agents
  exploop-admin cluster-info

Tenant API (tenant "demo"; region {REGION} is the only one, so jobs need not name it):
  curl -s -X POST $API/api/v1/jobs -H "Authorization: Bearer $TENANT_KEY" \\
    -H 'Content-Type: application/json' -d '{body}'
  curl -s $API/api/v1/jobs -H "Authorization: Bearer $TENANT_KEY"
""")

    def _sample_repo(self) -> Path:
        """Commit the sample files shipped in the package into a local git repository."""
        repo = self.dir / "sample-repo"
        if (repo / ".git").exists():
            return repo
        source = resources.files("exploop") / "sample_repo"
        with resources.as_file(source) as src:
            shutil.copytree(src, repo, dirs_exist_ok=True)
        env = dict(os.environ, GIT_AUTHOR_NAME="Exploop", GIT_AUTHOR_EMAIL="demo@exploop.invalid",
                   GIT_COMMITTER_NAME="Exploop", GIT_COMMITTER_EMAIL="demo@exploop.invalid")
        for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "commit", "-q", "-m", "sample repository"]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        return repo

    def _demo(self, creds: dict) -> None:
        tenant = self._tenant_key(creds)
        headers = {"Authorization": f"Bearer {tenant}"}
        repo = self._sample_repo()
        reply = requests.post(self.api_url + "/api/v1/jobs", headers=headers, timeout=30, json={
            "repo_url": f"file://{repo}", "ref": "main", "capability": "secrets"})
        if reply.status_code >= 400:
            raise RuntimeError(f"demo scan refused: {reply.text}")
        job_id = reply.json()["id"]
        _echo(f"Demo: secrets scan of {repo} submitted as job {job_id}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = requests.get(f"{self.api_url}/api/v1/jobs/{job_id}", headers=headers, timeout=30).json()
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
        else:
            _echo("Demo: the scan did not finish within 120 s; follow it with the curl commands above")
            return
        if job["status"] != "completed":
            _echo(f"Demo: the scan {job['status']}: {job.get('error')}")
            return
        findings = requests.get(f"{self.api_url}/api/v1/jobs/{job_id}/findings", headers=headers,
                                timeout=30).json()["items"]
        _echo(f"Demo: job {job_id} completed with {len(findings)} findings:")
        for f in findings:
            _echo(f"  {f['severity']:<8} {f['rule_id']:<40} {f['path']}:{f['start_line']}  {f['preview'] or ''}")
        _echo("")
