"""End to end with real processes: tenant REST -> Redis queue -> exploop-agent -> findings."""
from __future__ import annotations

import sqlite3
import time

import pytest
import requests

from tests.support.databases import PG_URL
from tests.support.stack import auth, make_git_repo

pytestmark = pytest.mark.e2e

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


def test_secrets_job_end_to_end(stack, tmp_path, database_url):
    stack.start_api()
    tenant = stack.tenant()
    agent = stack.start_agent()
    name = stack.wait_agent_online()[0]["name"]
    assert "agent registered" in agent.output()

    repo = make_git_repo(tmp_path / "repo", {
        "README.md": "demo\n",
        "app/settings.py": f'DEBUG = False\nAWS_ACCESS_KEY_ID = "{AWS_KEY}"\n',
    })
    reply = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10,
                          json={"repo_url": repo, "ref": "main", "capability": "secrets",
                                "region": "us-east-1"})
    assert reply.status_code == 201, reply.text
    job = stack.wait_job(tenant, reply.json()["id"])
    assert job["status"] == "completed", job
    assert job["agent"] == name
    assert job["summary"]["by_severity"]["high"] == 1

    findings = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}/findings", headers=auth(tenant),
                            timeout=10)
    assert findings.status_code == 200
    items = findings.json()["items"]
    aws = [f for f in items if f["rule_id"] == "secrets.aws-access-key"]
    assert [(f["path"], f["start_line"]) for f in aws] == [("app/settings.py", 2)]
    assert aws[0]["preview"].startswith("AKIA") and AWS_KEY not in aws[0]["preview"]
    assert AWS_KEY not in findings.text and AWS_KEY not in requests.get(
        f"{stack.url}/api/v1/jobs/{job['id']}", headers=auth(tenant), timeout=10).text
    if not PG_URL:  # the secret value is nowhere in the database file
        path = database_url[len("sqlite:///"):]
        sqlite3.connect(path).execute("PRAGMA wal_checkpoint(FULL)").close()
        for suffix in ("", "-wal"):
            try:
                data = open(path + suffix, "rb").read()
            except FileNotFoundError:
                continue
            assert AWS_KEY.encode() not in data
    assert "job completed" in agent.output()
    assert AWS_KEY not in agent.output()


def test_lease_ttl_and_expiry_after_kill(stack, redis_client):
    stack.start_api()
    agent = stack.start_agent(HEARTBEAT_INTERVAL="1s")
    name = stack.wait_agent_online()[0]["name"]
    key = f"exploop:lease:{name}"
    ttl = redis_client.ttl(key)
    assert 0 < ttl <= 3  # 3 x heartbeat interval
    time.sleep(2.5)  # renewals keep it alive past one TTL
    assert redis_client.exists(key)
    agent.kill()
    deadline = time.monotonic() + 6
    while redis_client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not redis_client.exists(key)
    view = stack.admin("GET", f"/admin/v1/agents/{name}").json()
    assert view["status"] == "offline"


def test_restart_reuses_saved_key(stack, tmp_path):
    stack.start_api()
    home = tmp_path / "home"
    home.mkdir()
    first = stack.start_agent(home=home)
    name = stack.wait_agent_online()[0]["name"]
    saved = home / ".exploop" / "agent.json"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    assert first.stop() == 0
    # The bootstrap token is spent (max uses 1): a restart must use the saved key.
    second = stack.start_agent(home=home)
    assert stack.wait_agent_online(name)[0]["name"] == name
    assert "using saved agent key" in second.output()
    agents = stack.admin("GET", "/admin/v1/agents").json()
    assert agents["total"] == 1
