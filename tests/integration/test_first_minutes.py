"""A newcomer's first ten minutes: ``exploop up`` prints commands that work as typed,
``exploop create-admin-token`` finds the stack's database from anywhere, nothing leaks
at exit, and an unauthenticated request learns nothing about the schema.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
import requests

from exploop.run.children import Child, free_port, script

pytestmark = pytest.mark.e2e


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell: none of the developer's or the tests' EXPLOOP_* settings."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("EXPLOOP_", "PROMETHEUS_")) and k not in ("API_URL", "REDIS_URL")}
    return dict(base, **extra)


def banner_commands(output: str) -> list[str]:
    """The shell lines the banner prints after 'In another shell', continuation lines joined."""
    lines = output.split("In another shell", 1)[1].splitlines()[1:]
    commands, current = [], ""
    for line in lines:
        if not line.startswith("  "):  # a heading
            continue
        if line.startswith("   ") and not current:  # indented, but no command to continue
            continue
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(current)
        current = ""
    return commands


def test_exploop_up_no_demo_prints_commands_that_work_and_leaves_nothing(tmp_path):
    home, work, elsewhere, tmp = (tmp_path / d for d in ("home", "work", "elsewhere", "tmp"))
    for d in (home, work, elsewhere, tmp):
        d.mkdir()
    env = clean_env(HOME=str(home), TMPDIR=str(tmp))
    port = free_port()
    up = Child("up", [script("exploop"), "up", "--no-demo", "--port", str(port), "--flower-port", str(free_port())],
               env=env, cwd=str(work), log_path=tmp_path / "up.log")
    try:
        deadline = time.monotonic() + 120
        while "curl -s $API/api/v1/jobs" not in (tmp_path / "up.log").read_text():
            assert up.alive() and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        output = (tmp_path / "up.log").read_text()
        commands = banner_commands(output)
        exports = [c for c in commands if c.startswith("export ")]
        assert any(re.fullmatch(r"export API=\S+ TENANT_KEY=rtenant_\S+", c) for c in exports), exports
        assert any(re.fullmatch(r"export EXPLOOP_API_URL=\S+ EXPLOOP_ADMIN_TOKEN=radmin_\S+", c)
                   for c in exports), exports
        assert "Demo:" not in output

        # Every command, typed as printed in a fresh shell, works.
        jobs: list[str] = []
        for command in (c for c in commands if not c.startswith("export ")):
            result = subprocess.run(["bash", "-c", "\n".join(exports + [command])], env=env, cwd=str(elsewhere),
                                    capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (command, result.stdout, result.stderr)
            if command.startswith("curl -s -X POST"):
                job = json.loads(result.stdout)
                assert job["status"] in ("queued", "running", "completed") and job["region"] == "local", job
                jobs.append(job["id"])
            if command.startswith("exploop-admin get agents"):
                assert re.search(r"^agent-local-1\s+online\s+local\s+\d+/2\s", result.stdout, re.M), result.stdout

        # The scan it submitted completes: the sample repository exists without the demo.
        assert len(jobs) == 1
        key = re.search(r"TENANT_KEY=(\S+)", "\n".join(exports)).group(1)
        deadline = time.monotonic() + 90
        while (job := requests.get(f"http://127.0.0.1:{port}/api/v1/jobs/{jobs[0]}", timeout=10,
                                   headers={"Authorization": f"Bearer {key}"}).json())["status"] != "completed":
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.5)

        # The first admin token, from another directory: the stack's own database, named.
        made = subprocess.run([script("exploop"), "create-admin-token", "--name", "alice"], env=env,
                              cwd=str(elsewhere), capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        assert made.stderr.strip().endswith(
            f"admin token for 'alice' (role admin) in sqlite:///{work / '.exploop' / 'exploop.db'};"
            " shown once, store it safely")
        listed = subprocess.run([script("exploop-admin"), "--api-url", f"http://127.0.0.1:{port}",
                                 "--token", made.stdout.strip(), "get", "agents"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "agent-local-1" in listed.stdout, listed.stderr
    finally:
        code = up.stop(timeout=60)
    assert code == 0, (tmp_path / "up.log").read_text()[-2000:]
    # `exploop api` removed its Prometheus multiprocess directory at exit.
    assert [p.name for p in tmp.iterdir() if p.name.startswith("exploop-metrics-")] == []


def test_create_admin_token_without_a_database_says_where_it_looked(tmp_path):
    env = clean_env(HOME=str(tmp_path))
    made = subprocess.run([script("exploop"), "create-admin-token"], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 1 and made.stdout == ""
    assert made.stderr.strip() == (
        f"Error: no database at {tmp_path / '.exploop' / 'exploop.db'}: run this in the directory of"
        " `exploop up` (or while one runs), or set EXPLOOP_SQLALCHEMY_DATABASE_URI to the API's database")
    assert not (tmp_path / ".exploop").exists()


@pytest.mark.parametrize("method,path,kwargs", [
    ("post", "/api/v1/jobs", {"json": {"bogus": 1}}),
    ("post", "/api/v1/jobs", {"data": "{not json", "content_type": "application/json"}),
    ("put", "/platform/lease", {"json": {"heartbeat_interval": "often"}}),
    ("post", "/platform/jobs/abc/claim", {"json": {"attempt": "first"}}),
    ("get", "/admin/v1/agents?status=bogus", {}),
    ("post", "/admin/v1/tokens", {"json": {"max_uses": -1}}),
])
def test_unauthenticated_requests_get_401_before_body_validation(client, admin_token, method, path, kwargs):
    for headers in ({}, {"Authorization": "Bearer rtenant_unknown"}, {"Authorization": "Bearer ragent_unknown"},
                    {"Authorization": "Bearer radmin_unknown"}):
        reply = getattr(client, method)(path, headers=headers, **kwargs)
        assert reply.status_code == 401, (headers, reply.json)
        assert reply.json["error"] == "authentication failed" and "detail" in reply.json
    if path.startswith("/admin/"):  # with a valid credential, the same request is a 400
        reply = getattr(client, method)(path, headers={"Authorization": f"Bearer {admin_token}"}, **kwargs)
        assert reply.status_code == 400


def test_openapi_documents_the_unknown_region_400_of_a_submit(client):
    spec = client.get("/openapi.json").json
    bad = spec["paths"]["/api/v1/jobs"]["post"]["responses"]["400"]
    assert "unknown region" in bad["description"] and bad["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorOut")
    assert "unknown region" in spec["components"]["schemas"]["JobCreate"]["properties"]["region"]["description"]


def test_region_auto_is_the_tokens_region_else_the_servers_only_one(client, admin_token):
    """REGION unset (auto): the agent registers without a region and the API picks it."""
    admin = {"Authorization": f"Bearer {admin_token}"}

    def register(**token_fields) -> tuple[int, dict]:
        token = client.post("/admin/v1/tokens", headers=admin, json={"max_uses": 1, **token_fields}).json["token"]
        reply = client.post("/platform/register", json={"token": token, "capabilities": ["sast"]})
        return reply.status_code, reply.json

    # The tests' server configures one region (us-east-1) and has no agent yet.
    status, body = register()
    assert status == 201 and body["region"] == "us-east-1"
    status, body = register(region="eu-west-1")  # a token bound to a region
    assert status == 201 and body["region"] == "eu-west-1"
    status, body = register()  # now two regions: no guess
    assert status == 400 and body["error"] == "region required: this server has several regions"
    assert body["detail"] == {"region": ["set REGION to one of eu-west-1, us-east-1"]}
