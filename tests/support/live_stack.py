"""Helpers for the admin CLI and API tests: a module-wide real stack, and the CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import requests
from click.testing import CliRunner, Result

from admin.cli import main
from exploop.client import PlatformClient
from exploop.run.children import Child, free_port, start_redis
from tests.support.databases import fresh_database_url
from tests.support.stack import Stack, auth

__all__ = ["LiveStack", "start_live_stack", "cli", "heartbeat", "submit_job", "claim_jobs", "lines_of"]


class LiveStack(Stack):
    """A :class:`Stack` with its own redis-server and database, shared by a test module.

    It owns a private Redis, so function-scoped fixtures elsewhere (which flush the
    session Redis) can never pull leases or queues from under it.
    """

    redis_child: Child

    def register(self, token: str, **fields) -> requests.Response:
        body = {"token": token, "region": "us-east-1", "capabilities": ["secrets"], **fields}
        return requests.post(f"{self.url}/platform/register", json=body, timeout=30)

    def stop(self) -> None:
        super().stop()
        self.redis_child.stop()


def start_live_stack(tmp: Path, workers: int = 1) -> LiveStack:
    """Start redis-server, a fresh database and a real ``exploop api`` process."""
    port = free_port()
    redis_child = start_redis(port, tmp / "redis.log")
    database_url = fresh_database_url(tmp)
    stack = LiveStack(tmp, database_url, f"redis://127.0.0.1:{port}/0")
    stack.redis_child = redis_child
    try:
        stack.start_api(workers=workers)
    except BaseException:
        stack.stop()
        raise
    return stack


def cli(stack_or_url, *args: str, token: str | None = None, input: str | None = None,
        env: dict | None = None) -> Result:
    """Run ``exploop-admin --api-url URL --token TOKEN ARGS`` in-process (click's CliRunner)."""
    url = stack_or_url if isinstance(stack_or_url, str) else stack_or_url.url
    if token is None and not isinstance(stack_or_url, str):
        token = stack_or_url.admin_token
    base = ["--api-url", url] + (["--token", token] if token else [])
    # Neither the developer's environment nor their ~/.exploop/config may leak in.
    clean = {"EXPLOOP_API_URL": None, "EXPLOOP_ADMIN_TOKEN": None, "EXPLOOP_CONTEXT": None,
             "EXPLOOP_CONFIG": os.devnull}
    return CliRunner().invoke(main, [*base, *args], input=input, env={**clean, **(env or {})})


def heartbeat(stack: Stack, key: str, jobs_running: int = 0, max_jobs: int | None = None,
              running_jobs: list[str] | None = None, **extra) -> dict:
    """Renew an agent's lease exactly as ``exploop-agent`` does (PUT /platform/lease)."""
    body = {"jobs_running": jobs_running, "running_jobs": running_jobs or [], "version": "0.1.0",
            "host": "test-host", "heartbeat_interval": 30, **extra}
    if max_jobs:
        body["max_jobs"] = max_jobs
    return PlatformClient(stack.url, key).renew_lease(body)


def submit_job(stack: Stack, tenant_key: str, capability: str = "secrets") -> dict:
    reply = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant_key), timeout=30,
                          json={"repo_url": "file:///nonexistent/repo", "capability": capability,
                                "region": "us-east-1"})
    assert reply.status_code == 201, reply.text
    return reply.json()


def claim_jobs(stack: Stack, agent_key: str, tenant_key: str, count: int, capability: str = "secrets") -> list[str]:
    """Submit ``count`` jobs and claim them as the agent: jobs really running on it."""
    agent = PlatformClient(stack.url, agent_key)
    ids = []
    for _ in range(count):
        job = submit_job(stack, tenant_key, capability)
        agent.claim(job["id"], job["attempt"])
        ids.append(job["id"])
    return ids


def lines_of(text_: str, word: str) -> list[str]:
    """The lines of a table that mention ``word`` (what ``| grep word`` shows)."""
    return [line for line in text_.splitlines() if word in line]
