"""No credential and no planted secret in plain text: not in the database, not in Redis,
not in any log line of the API, the agent or the controller, after a full end-to-end
secrets job (real processes, debug logging everywhere)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import MetaData, create_engine, select

from exploop.run.children import Child, script, wait_http
from tests.support.databases import PG_URL
from tests.support.git_server import PrivateGitHost
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


def _database_places(database_url: str) -> dict[str, bytes]:
    """Every row of every table, and with SQLite the bytes of every file it keeps."""
    places = {"database rows": _database_text(database_url)}
    if not PG_URL:
        path = database_url[len("sqlite:///"):]
        # Fold the write-ahead log into the file, then read every file SQLite keeps.
        sqlite3.connect(path).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
        for suffix in ("", "-wal", "-journal"):
            if os.path.exists(path + suffix):
                places[f"database file{suffix}"] = Path(path + suffix).read_bytes()
    return places


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

    # Everything a tenant gave is checked everywhere; the platform's own credentials are
    # stored hashed (their hashes are no secret), so only their values are checked.
    secrets["repository token"] = REPO_TOKEN
    at_rest = dict(secrets)
    places: dict[str, bytes] = {"redis": redis_dump, **_database_places(database_url)}
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


# A private repository's password, given in the URL; the host is a loopback HTTPS git server.
PRIVATE_PASSWORD = "s3cr3t-Pr1vate-Repo-Passw0rd"


def _unkeyed_values(checkout: Path) -> dict[str, str]:
    """What the agent's scanner sends for the planted secrets: plain SHA-256 hashes and the
    fingerprints made from them. None of it may be stored as is."""
    out = subprocess.run([sys.executable, "-m", "workers.scanners.secrets", str(checkout)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    values = {}
    for finding in json.loads(out)["findings"]:
        values[f"plain hash {finding['rule_id']}"] = finding["secret_hash"]
        values[f"scanner fingerprint {finding['rule_id']}"] = finding["fingerprint"]
        values[f"unkeyed stored fingerprint {finding['rule_id']}"] = hashlib.sha256(
            finding["fingerprint"].encode()).hexdigest()[:32]
    assert len(values) >= 9, values
    return values


def test_private_repository_retry_leaves_nothing_readable(tmp_path, database_url, redis_url):
    """A scan of a private repository over HTTPS with credentials in the URL, whose first
    attempt fails (the host answers 503): the retry clones with the same credentials, and
    afterwards no credential, planted secret or unkeyed hash of either is in any table and
    column, any log line or any Redis key."""
    source = tmp_path / "private-src"
    make_git_repo(source, {"README.md": "private\n",
                           "app/settings.py": (f'AWS_ACCESS_KEY_ID = "{AWS_KEY_ID}"\n'
                                               f'aws_secret_access_key = "{AWS_SECRET}"\n'
                                               f'GITHUB_TOKEN = "{GITHUB_TOKEN}"\n'
                                               f'db_password = "{DB_PASSWORD}"\n')})
    (tmp_path / "git-root").mkdir()
    with PrivateGitHost(tmp_path / "git-root", tmp_path, "oauth2", PRIVATE_PASSWORD) as host:
        url = host.publish("app.git", source).replace("https://", f"https://oauth2:{PRIVATE_PASSWORD}@")
        stack = VerboseStack(tmp_path, database_url, redis_url,
                             extra_env={"EXPLOOP_REPO_DESTINATIONS_ALLOW": "127.0.0.1/32"})
        try:
            stack.start_api()
            stack.start_controller()
            tenant = stack.tenant("acme")
            stack.start_agent(LOG_LEVEL="debug", GIT_SSL_CAINFO=str(host.cert))
            stack.wait_agent_online()
            host.fail_next = 1  # the first attempt's fetch gets a 503
            reply = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10, json={
                "repo_url": url, "ref": "main", "capability": "secrets", "region": "us-east-1"})
            assert reply.status_code == 201, reply.text
            job = stack.wait_job(tenant, reply.json()["id"], timeout=120)
            assert job["status"] == "completed" and job["attempt"] == 2, job
            assert job["repo_url"] == f"https://***@127.0.0.1:{host.port}/app.git"
            assert host.authorized_fetches() >= 1 and host.fail_next == 0
            findings = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}/findings", headers=auth(tenant),
                                    timeout=10).json()["items"]
            assert {"secrets.aws-access-key", "secrets.github-token"} <= {f["rule_id"] for f in findings}
            time.sleep(1.5)  # a few more debug-logged lease renewals
            redis_dump = _redis_text(redis_url)
        finally:
            stack.stop()

    basic = base64.b64encode(f"oauth2:{PRIVATE_PASSWORD}".encode()).decode()
    secrets = {"repository password": PRIVATE_PASSWORD, "basic auth header": basic,
               "AWS key id": AWS_KEY_ID, "AWS secret": AWS_SECRET, "GitHub token": GITHUB_TOKEN,
               "password": DB_PASSWORD}
    for name, value in list(secrets.items()):
        secrets[f"sha256 of {name}"] = hashlib.sha256(value.encode()).hexdigest()
    secrets.update(_unkeyed_values(source))
    places = {"redis": redis_dump, **_database_places(database_url)}
    places.update({f"log {p.name}": p.read_bytes() for p in tmp_path.glob("*.log")})
    assert b"job requeued" in places["log api.log"] or b"job requeued" in places["log controller.log"]
    leaks = [f"{what} in {where}" for what, value in secrets.items()
             for where, data in places.items() if value.encode() in data]
    assert leaks == []
