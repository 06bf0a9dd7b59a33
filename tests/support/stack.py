"""A real API server process, its controller and agents, started and stopped by a test."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import requests

from exploop.config import agent_key_file
from exploop.core.keyring import generate_key
from exploop.run.children import Child, free_port, script, start_redis, wait_http

__all__ = ["Stack", "RestartableRedis", "auth", "make_git_repo", "TEST_SECRET_KEY"]

#: The server key of every test API (credentials in repository URLs need one).
TEST_SECRET_KEY = generate_key()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


class Stack:
    """A real API server process plus agents started on demand, all owned by the test."""

    def __init__(self, tmp: Path, database_url: str, redis_url: str, extra_env: dict | None = None):
        self.tmp = tmp
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=database_url,
                        EXPLOOP_REDIS_URL=redis_url, EXPLOOP_ALLOW_LOCAL_REPOS="true",
                        EXPLOOP_REGIONS="us-east-1", EXPLOOP_SECRET_KEY=TEST_SECRET_KEY,
                        **(extra_env or {}))
        self.api = None
        self.controller = None
        self.agents: list[Child] = []
        self.admin_token = None

    def start_api(self, workers: int = 1, threads: int = 8) -> None:
        self.api = Child("api", [script("exploop"), "api", "--port", str(self.port),
                                 "--workers", str(workers), "--threads", str(threads),
                                 "--log-level", "warning"],
                         env=self.env, log_path=self.tmp / f"api-{self.port}.log")
        wait_http(self.url + "/health", 30, self.api)
        if self.admin_token is None:
            out = subprocess.run([script("exploop"), "create-admin-token", "--name", "tests"],
                                 env=self.env, capture_output=True, text=True, check=True)
            self.admin_token = out.stdout.strip()

    def stop_api(self) -> None:
        self.api.stop()

    def start_controller(self, interval: str = "0.5s") -> Child:
        self.controller = Child("controller", [script("exploop"), "controller", "--interval", interval],
                                env=self.env, log_path=self.tmp / f"controller-{self.port}.log")
        return self.controller

    def admin(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, self.url + path, headers=auth(self.admin_token), timeout=30, **kw)

    def bootstrap_token(self, max_uses: int = 1) -> str:
        reply = self.admin("POST", "/admin/v1/tokens", json={"max_uses": max_uses, "expires": "1h"})
        assert reply.status_code == 201, reply.text
        return reply.json()["token"]

    def tenant(self, name: str = "acme", plan: str | None = None) -> str:
        reply = self.admin("POST", "/admin/v1/tenants", json={"name": name, **({"plan": plan} if plan else {})})
        assert reply.status_code == 201, reply.text
        return reply.json()["api_key"]

    def start_agent(self, name: str | None = None, home: Path | None = None, **env) -> Child:
        home = home or self.tmp / f"agent-home-{len(self.agents)}"
        home.mkdir(exist_ok=True)
        agent_env = dict(os.environ, API_URL=self.url, HOME=str(home), REGION="us-east-1",
                         CAPABILITIES="secrets,sast,sca", MAX_CONCURRENT_JOBS="2",
                         HEARTBEAT_INTERVAL="1s", LOG_LEVEL="info", METRICS_PORT=str(free_port()))
        if name:
            agent_env["AGENT_NAME"] = name
        if "API_KEY" not in env and "BOOTSTRAP_TOKEN" not in env \
                and not agent_key_file(home / ".exploop", name).exists():
            agent_env["BOOTSTRAP_TOKEN"] = self.bootstrap_token()
        agent_env.update(env)
        child = Child(f"agent-{len(self.agents)}", [script("exploop-agent")], env=agent_env,
                      log_path=self.tmp / f"agent-{len(self.agents)}.log")
        self.agents.append(child)
        return child

    def wait_agent_online(self, name: str | None = None, timeout: float = 30, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            agents = self.admin("GET", "/admin/v1/agents").json()["items"]
            online = [a for a in agents if a["status"] == "online" and (name is None or a["name"] == name)]
            if len(online) >= count:
                return online
            for agent in self.agents:
                if not agent.alive() and not agent.stopped:
                    raise AssertionError(f"agent exited:\n{agent.output()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no online agent after {timeout}s: {agents}\n"
                             + "\n".join(a.output()[-2000:] for a in self.agents))

    def wait_job(self, tenant_key: str, job_id: str, statuses=("completed", "failed"),
                 timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            job = requests.get(f"{self.url}/api/v1/jobs/{job_id}", headers=auth(tenant_key), timeout=10).json()
            if job["status"] in statuses:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job not {statuses} after {timeout}s: {job}\n"
                             + "\n".join(a.output()[-3000:] for a in self.agents))

    def submit(self, tenant_key: str, **fields) -> str:
        body = {"repo_url": "https://git.example.invalid/acme/app.git", "capability": "secrets",
                "region": "us-east-1", **fields}
        reply = requests.post(f"{self.url}/api/v1/jobs", headers=auth(tenant_key), json=body, timeout=30)
        assert reply.status_code == 201, reply.text
        return reply.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.admin("GET", f"/admin/v1/jobs/{job_id}").json()

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             + "\n".join(f"--- {a.name}\n{a.output()[-1500:]}" for a in self.agents))

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop(timeout=20)
        if self.controller:
            self.controller.stop()
        if self.api:
            self.api.stop()


def make_git_repo(path: Path, files: dict[str, str]) -> str:
    """A git repository with ``files`` committed; returns its file:// URL."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "initial"]):
        subprocess.run(cmd, cwd=path, env=env, check=True)
    return f"file://{path}"


class RestartableRedis:
    """A private redis-server a test may restart (empty, as a Redis without persistence comes back)."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = tmp / f"redis-{self.port}.log"
        self.child = start_redis(self.port, self.log_path)

    def stop(self) -> None:
        self.child.stop()

    def start(self) -> None:
        self.child = start_redis(self.port, self.log_path)
