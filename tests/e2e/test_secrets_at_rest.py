"""No credential and no planted secret in plain text: not in the database, not in Redis,
not in any log line of the API, the agent or the controller, after a full end-to-end
secrets job (real processes, debug logging everywhere)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import MetaData, create_engine, select

from exploop.run.children import Child, script, wait_http
from tests.support.databases import PG_URL
from tests.support.stack import Stack, auth, make_git_repo

pytestmark = pytest.mark.e2e

# Planted in the scanned repository (well-known documentation examples, detected as secrets).
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
GITHUB_TOKEN = "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"
DB_PASSWORD = "Tr0ub4dor&3-correct-horse"
# A tenant's token in a repository URL: handed to the agent that clones, never shown back.
REPO_TOKEN = "glpat-Zq7xVb2nRt5wLk9pYd3m"


class VerboseStack(Stack):
    """The test stack with every process logging at debug level."""

    def start_api(self, workers: int = 2, threads: int = 8) -> None:
        self.api = Child("api", [script("exploop"), "api", "--port", str(self.port), "--workers",
                                 str(workers), "--threads", str(threads), "--log-level", "debug"],
                         env=self.env, log_path=self.tmp / "api.log")
        wait_http(self.url + "/health", 30, self.api)
        self.admin_token = subprocess.run(
            [script("exploop"), "create-admin-token", "--name", "tests"], env=self.env,
            capture_output=True, text=True, check=True).stdout.strip()

    def start_controller(self, interval: str = "0.5s") -> Child:
        self.controller = Child("controller", [script("exploop"), "controller", "--interval", interval,
                                               "--log-level", "debug"],
                                env=self.env, log_path=self.tmp / "controller.log")
        return self.controller


def _database_text(database_url: str) -> bytes:
    """Every row of every table, as text (any database)."""
    engine = create_engine(database_url)
    meta = MetaData()
    meta.reflect(engine)
    chunks = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                chunks.append(repr(tuple(row)))
    engine.dispose()
    return "\n".join(chunks).encode()


def _redis_text(url: str) -> bytes:
    client = redis.Redis.from_url(url)
    chunks = []
    for key in client.scan_iter("*"):
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"list":
            chunks.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            chunks.extend(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind in (b"set",):
            chunks.extend(client.smembers(key))
        elif kind == b"zset":
            chunks.extend(client.zrange(key, 0, -1))
        chunks.append(key)
    client.close()
    return b"\n".join(chunks)


def test_no_secret_in_database_redis_or_logs(tmp_path, database_url, redis_url):
    stack = VerboseStack(tmp_path, database_url, redis_url)
    try:
        stack.start_api()
        stack.start_controller()
        viewer = stack.admin("POST", "/admin/v1/admin-tokens", json={"name": "watcher", "role": "viewer"})
        tenant = stack.tenant("acme")
        preassigned = stack.admin("POST", "/admin/v1/agents", json={
            "name": "spare", "region": "us-east-1"}).json()["api_key"]
        bootstrap = stack.bootstrap_token()
        home = tmp_path / "agent-home"
        home.mkdir()
        stack.start_agent(home=home, BOOTSTRAP_TOKEN=bootstrap, LOG_LEVEL="debug")
        stack.wait_agent_online()
        agent_key = json.loads((home / ".exploop" / "agent.json").read_text())["api_key"]

        repo = make_git_repo(tmp_path / "repo", {
            "README.md": "demo\n",
            "app/settings.py": (f'AWS_ACCESS_KEY_ID = "{AWS_KEY_ID}"\n'
                                f'aws_secret_access_key = "{AWS_SECRET}"\n'
                                f'GITHUB_TOKEN = "{GITHUB_TOKEN}"\n'
                                f'db_password = "{DB_PASSWORD}"\n'),
        })
        reply = requests.post(f"{stack.url}/api/v1/jobs", timeout=10, json={
            "repo_url": repo, "ref": "main", "capability": "secrets", "region": "us-east-1"},
            headers=dict(auth(tenant), **{"Idempotency-Key": "e2e-1"}))
        assert reply.status_code == 201, reply.text
        job = stack.wait_job(tenant, reply.json()["id"])
        assert job["status"] == "completed", job
        findings = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}/findings", headers=auth(tenant),
                                timeout=10).json()["items"]
        found = {f["rule_id"] for f in findings}
        assert {"secrets.aws-access-key", "secrets.github-token", "secrets.secret-keyword"} <= found, found

        # A repository URL with a token (this host does not resolve: the clone fails).
        private = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10, json={
            "repo_url": f"https://oauth2:{REPO_TOKEN}@git.example.invalid/acme/private.git",
            "capability": "secrets", "region": "us-east-1"})
        assert private.status_code == 201, private.text
        failed = stack.wait_job(tenant, private.json()["id"], statuses=("failed",), timeout=120)
        assert failed["repo_url"] == "https://***@git.example.invalid/acme/private.git"
        shown = [private.text, json.dumps(failed),
                 requests.get(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10).text,
                 stack.admin("GET", f"/admin/v1/jobs/{failed['id']}").text,
                 stack.admin("GET", "/admin/v1/jobs").text]
        assert not [text for text in shown if REPO_TOKEN in text]

        # Credentials presented where they do not belong, and a spent bootstrap token: each
        # is logged as a failure, never with the credential itself.
        assert requests.get(f"{stack.url}/admin/v1/agents", headers=auth(tenant), timeout=10).status_code == 401
        assert requests.get(f"{stack.url}/api/v1/jobs", headers=auth(agent_key), timeout=10).status_code == 401
        assert requests.get(f"{stack.url}/platform/config", headers=auth(stack.admin_token),
                            timeout=10).status_code == 401
        assert requests.post(f"{stack.url}/platform/register", timeout=10, json={
            "token": bootstrap, "region": "us-east-1", "capabilities": ["sast"]}).status_code == 401
        time.sleep(1.5)  # a few more debug-logged lease renewals
        redis_dump = _redis_text(redis_url)
    finally:
        stack.stop()

    secrets = {"admin token": stack.admin_token, "viewer token": viewer.json()["token"],
               "tenant key": tenant, "agent key": agent_key, "pre-assigned agent key": preassigned,
               "bootstrap token": bootstrap, "AWS key id": AWS_KEY_ID, "AWS secret": AWS_SECRET,
               "GitHub token": GITHUB_TOKEN, "password": DB_PASSWORD}

    # Not yet in the database check: the job keeps its repository URL, token included, so
    # that a requeued attempt can clone again (encrypting it at rest is still to do).
    at_rest = dict(secrets)
    secrets["repository token"] = REPO_TOKEN
    places: dict[str, bytes] = {"redis": redis_dump, "database rows": _database_text(database_url)}
    if not PG_URL:
        path = database_url[len("sqlite:///"):]
        # Fold the write-ahead log into the file, then read every file SQLite keeps.
        sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
        for suffix in ("", "-wal", "-journal"):
            if os.path.exists(path + suffix):
                places[f"database file{suffix}"] = Path(path + suffix).read_bytes()
    logs = {p.name: p.read_bytes() for p in tmp_path.glob("*.log")}
    assert {"api.log", "controller.log", "agent-0.log"} <= set(logs)
    for name in ("api.log", "agent-0.log"):
        assert logs[name].count(b"\n") > 20, f"{name} is nearly empty: debug logging is not on"
    assert b"took leadership" in logs["controller.log"]
    assert b"lease renewed successfully" in logs["agent-0.log"]
    assert b"authentication failed" in logs["api.log"] and b"invalid bootstrap token" in logs["api.log"]
    places.update({f"log {name}": data for name, data in logs.items()})

    leaks = [f"{what} in {where}" for what, value in secrets.items()
             for where, data in places.items() if value.encode() in data
             and (where.startswith("log") or what in at_rest)]
    assert leaks == []
