"""Helpers for the API contract tests: a live API with its own Redis, and the
operations of the OpenAPI document with the credential each one needs."""
from __future__ import annotations

import re
from pathlib import Path

import requests

from exploop.api.app import create_app
from exploop.run.children import free_port, start_redis
from tests.support.databases import fresh_database_url
from tests.support.live_stack import LiveStack
from tests.support.stack import auth

__all__ = ["start_stack", "openapi_document", "operations", "Operation", "World", "build_world",
           "auth"]

#: Routes that are not API operations: the document itself, its rendered page, static files.
NOT_OPERATIONS = {"static", "docs_static", "api-docs.openapi_json", "api-docs.openapi_swagger_ui"}
#: The admin console (/ui/) serves HTML pages, not API operations: its endpoints start so.
CONSOLE_PREFIX = "console."


def start_stack(tmp: Path, workers: int = 1, threads: int = 8, **env: str) -> LiveStack:
    """A real ``exploop api`` process with its own redis-server and a fresh database."""
    port = free_port()
    redis_child = start_redis(port, tmp / "redis.log")
    database_url = fresh_database_url(tmp)
    stack = LiveStack(tmp, database_url, f"redis://127.0.0.1:{port}/0", extra_env=env)
    stack.redis_child = redis_child
    try:
        stack.start_api(workers=workers, threads=threads)
    except BaseException:
        stack.stop()
        raise
    return stack


def openapi_document() -> dict:
    """The document the app factory serves (no database or Redis needed to render it)."""
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": "sqlite://",
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    reply = app.test_client().get("/openapi.json")
    assert reply.status_code == 200
    app.extensions["redis"].close()
    app.extensions["redis_reads"].close()
    return reply.json


class Operation:
    """One operation of the document: method, path template, audience, role."""

    def __init__(self, method: str, path: str, spec: dict):
        self.method, self.path, self.spec = method.upper(), path, spec
        security = spec.get("security") or []
        self.scheme = next(iter(security[0]), None) if security else None
        self.role = spec.get("x-required-role")
        self.params = re.findall(r"{(\w+)}", path)

    @property
    def audience(self) -> str | None:
        return {"agentKey": "agent", "tenantKey": "tenant", "adminToken": "admin"}.get(self.scheme)

    @property
    def changes(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")

    def url(self, **values) -> str:
        return re.sub(r"{(\w+)}", lambda m: str(values[m.group(1)]), self.path)

    def __repr__(self) -> str:
        return f"{self.method} {self.path}"


def operations(document: dict) -> list[Operation]:
    """Every operation of the document, in path order."""
    found = []
    for path, item in document["paths"].items():
        for method, spec in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                found.append(Operation(method, path, spec))
    return found


class World:
    """Credentials and objects for every audience on one live API."""

    def __init__(self, stack: LiveStack):
        self.stack = stack
        self.url = stack.url
        self.admin = stack.admin_token
        self.tokens: dict[str, str] = {}
        self.viewer = ""
        self.tenant = ""
        self.other_tenant = ""
        self.agent = ""
        self.agent_name = ""
        self.other_agent = ""
        self.other_agent_name = ""
        self.jobs: list[str] = []

    def headers(self, audience: str | None) -> dict:
        token = {"agent": self.agent, "tenant": self.tenant, "admin": self.admin}.get(audience)
        return auth(token) if token else {}

    def post(self, path: str, token: str, **kw) -> requests.Response:
        return requests.post(self.url + path, headers=auth(token), timeout=30, **kw)


def build_world(stack: LiveStack) -> World:
    """Two tenants, two agents (one holding running jobs), a viewer token, queued jobs."""
    world = World(stack)
    world.tenant = stack.tenant("acme")
    world.other_tenant = stack.tenant("globex")
    for attr, name in (("agent", "fuzz-agent"), ("other_agent", "other-agent")):
        reply = stack.admin("POST", "/admin/v1/agents", json={
            "name": name, "region": "us-east-1", "capabilities": ["sast", "sca", "secrets"],
            "max_jobs": 50})
        assert reply.status_code == 201, reply.text
        setattr(world, attr, reply.json()["api_key"])
        setattr(world, attr + "_name", name)
    reply = stack.admin("POST", "/admin/v1/admin-tokens", json={"name": "watcher", "role": "viewer"})
    assert reply.status_code == 201, reply.text
    world.viewer = reply.json()["token"]
    for _ in range(3):
        reply = world.post("/api/v1/jobs", world.tenant, json={
            "repo_url": "https://git.example.invalid/acme/app.git", "capability": "sast",
            "region": "us-east-1"})
        assert reply.status_code == 201, reply.text
        world.jobs.append(reply.json()["id"])
    return world
