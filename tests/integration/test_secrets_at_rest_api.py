"""Issue 18 through the API (Flask test client, real database and Redis): sealed credentials,
keyed fingerprints, rotation, the start-up refusal, migration 0003, the destination policy at
submit, control characters, and the revoke contract."""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest
import redis
from sqlalchemy import select, text

from exploop.api.app import create_app, init_db
from exploop.config import ConfigError
from exploop.core.extensions import db
from exploop.core.keyring import Keyring, generate_key
from exploop.core.migrate import upgrade
from exploop.core.models import Finding, Job, Tenant
from exploop.run.children import script

TOKEN = "glpat-Zq7xVb2nRt5wLk9pYd3m"
PRIVATE = f"https://oauth2:{TOKEN}@github.com/acme/private.git"
SHOWN = "https://***@github.com/acme/private.git"
POLICY_ERROR = "is refused by the destination policy: repositories must be on public addresses, or on hosts the" \
               " operator allows"


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def new_tenant(client, admin_token: str, name: str) -> str:
    reply = client.post("/admin/v1/tenants", headers=auth(admin_token), json={"name": name})
    assert reply.status_code == 201, reply.json
    return reply.json["api_key"]


def new_agent(client, admin_token: str) -> dict:
    token = client.post("/admin/v1/tokens", headers=auth(admin_token),
                        json={"max_uses": 1, "expires": "1h"}).json["token"]
    reply = client.post("/platform/register", json={"token": token, "region": "us-east-1",
                                                     "capabilities": ["secrets", "sast"]})
    assert reply.status_code == 201, reply.json
    return auth(reply.json["api_key"])


def submit(client, tenant_key: str, **fields):
    body = {"repo_url": PRIVATE, "capability": "secrets", "region": "us-east-1", **fields}
    return client.post("/api/v1/jobs", headers=auth(tenant_key), json=body)


def claim(client, agent: dict, job_id: str, attempt: int) -> dict:
    reply = client.post(f"/platform/jobs/{job_id}/claim", headers=agent, json={"attempt": attempt})
    assert reply.status_code == 200, reply.json
    return reply.json


def row(app, job_id: str) -> Job:
    with app.app_context():
        job = db.session.get(Job, job_id)
        db.session.expunge(job)
        return job


def test_credentials_are_sealed_and_go_only_to_the_claiming_agent(app, client, admin_token, tenant_key,
                                                                   redis_url):
    agent = new_agent(client, admin_token)
    reply = submit(client, tenant_key)
    assert reply.status_code == 201 and reply.json["repo_url"] == SHOWN
    job_id = reply.json["id"]
    stored = row(app, job_id)
    assert stored.repo_url == SHOWN and TOKEN not in stored.repo_credentials
    assert Keyring([app.config["SECRET_KEY"]]).decrypt(stored.repo_credentials) == f"oauth2:{TOKEN}"
    client_redis = redis.Redis.from_url(redis_url)
    assert not [k for k in client_redis.scan_iter("*") if client_redis.type(k) == b"list"
                and any(TOKEN.encode() in m for m in client_redis.lrange(k, 0, -1))]

    first = claim(client, agent, job_id, 1)
    assert first["repo_url"] == PRIVATE and first["destinations"] == {"allow": [], "deny": []}
    # A failed attempt that may be retried keeps the credentials for the next attempt.
    failed = client.post(f"/platform/jobs/{job_id}/fail", json={"attempt": 1, "error": "boom", "retry": True},
                         headers=dict(agent, **{"X-Job-Token": first["job_token"]}))
    assert failed.status_code == 200 and failed.json["status"] == "queued"
    second = claim(client, agent, job_id, 2)
    assert second["repo_url"] == PRIVATE
    done = client.post(f"/platform/jobs/{job_id}/complete", json={"attempt": 2, "findings": [], "summary": {}},
                       headers=dict(agent, **{"X-Job-Token": second["job_token"]}))
    assert done.status_code == 200
    assert row(app, job_id).repo_credentials is None
    for view in (client.get(f"/api/v1/jobs/{job_id}", headers=auth(tenant_key)),
                 client.get(f"/admin/v1/jobs/{job_id}", headers=auth(admin_token))):
        assert TOKEN not in view.get_data(as_text=True)


def test_cancelled_and_permanently_failed_jobs_lose_their_credentials(app, client, admin_token, tenant_key):
    agent = new_agent(client, admin_token)
    cancelled = submit(client, tenant_key).json["id"]
    assert client.post(f"/api/v1/jobs/{cancelled}/cancel", headers=auth(tenant_key)).status_code == 200
    assert row(app, cancelled).repo_credentials is None
    failing = submit(client, tenant_key).json["id"]
    held = claim(client, agent, failing, 1)
    client.post(f"/platform/jobs/{failing}/fail", json={"attempt": 1, "error": "no", "retry": False},
                headers=dict(agent, **{"X-Job-Token": held["job_token"]}))
    assert row(app, failing).status == "failed" and row(app, failing).repo_credentials is None
    # An admin retry would clone without them: it is refused with the reason.
    retried = client.post(f"/admin/v1/jobs/{failing}/retry", headers=auth(admin_token))
    assert retried.status_code == 409 and retried.json["detail"] == {"reason": "credentials_deleted"}


def test_credentials_are_refused_by_a_server_without_a_key(app_config, tenant_key):
    app = create_app(dict(app_config, SECRET_KEY=None))
    reply = submit(app.test_client(), tenant_key)
    assert reply.status_code == 400
    assert reply.json["error"] == ("this server does not accept credentials in repository URLs: its operator has"
                                   " not set EXPLOOP_SECRET_KEY")
    app.extensions["redis"].close()


def _complete_with_secret(client, agent, tenant_key, plain_hash: str) -> Finding:
    job_id = submit(client, tenant_key, repo_url="https://github.com/acme/app.git").json["id"]
    held = claim(client, agent, job_id, 1)
    finding = {"rule_id": "secrets.secret-keyword", "severity": "high", "path": "settings.py", "start_line": 3,
               "message": "Hard-coded secret", "engine": "detect-secrets", "secret_hash": plain_hash,
               "fingerprint": hashlib.sha256(f"detect-secrets|rule|settings.py|{plain_hash}".encode()).hexdigest(),
               "preview": "hunt****"}
    reply = client.post(f"/platform/jobs/{job_id}/complete", json={"attempt": 1, "findings": [finding],
                                                                    "summary": {}},
                        headers=dict(agent, **{"X-Job-Token": held["job_token"]}))
    assert reply.status_code == 200, reply.json
    return client.get(f"/api/v1/jobs/{job_id}/findings", headers=auth(tenant_key)).json["items"][0], finding


def test_secret_fingerprints_are_keyed_per_tenant_and_stable_within_one(app, client, admin_token, tenant_key):
    agent = new_agent(client, admin_token)
    other = new_tenant(client, admin_token, "globex")
    plain = hashlib.sha256(b"hunter2-password").hexdigest()
    first, sent = _complete_with_secret(client, agent, tenant_key, plain)
    again, _ = _complete_with_secret(client, agent, tenant_key, plain)
    theirs, _ = _complete_with_secret(client, agent, other, plain)
    assert first["fingerprint"] == again["fingerprint"]
    assert first["fingerprint"] != theirs["fingerprint"]
    unkeyed = {plain, sent["fingerprint"], hashlib.sha256(sent["fingerprint"].encode()).hexdigest()[:32]}
    with app.app_context():
        stored = db.session.execute(select(Finding.secret_hash, Finding.fingerprint)).all()
        sealed_keys = db.session.scalars(select(Tenant.fingerprint_key).where(
            Tenant.fingerprint_key.is_not(None))).all()
    assert len({h for h, _ in stored}) == 2 and len(sealed_keys) == 2
    assert not {value for pair in stored for value in pair} & unkeyed


@pytest.mark.parametrize("bad", ["https://github.com/a\nINFO forged line", "https://github.com/a\r",
                                 "https://github.com/\tx",
                                 "https://github.com/a\x1b[2J", "https://github.com/a\u2028b",
                                 "https://github.com/a b", "https://github.com/a\x85"])
def test_control_characters_in_urls_are_refused(client, tenant_key, bad):
    reply = submit(client, tenant_key, repo_url=bad)
    assert reply.status_code == 400 and reply.json["error"] == \
        "repository URL contains whitespace or control characters"


@pytest.mark.parametrize("ref", ["main\nINFO forged", "main\r", "ma\tin", "main\x1b[2J", "main\u2028"])
def test_control_characters_in_refs_are_refused(client, tenant_key, ref):
    reply = submit(client, tenant_key, repo_url="https://github.com/acme/app.git", ref=ref)
    assert reply.status_code == 400 and "ref" in reply.json["detail"]


@pytest.mark.parametrize("url", ["https://127.0.0.1:8443/x.git", "https://localhost/x.git",
                                 "https://169.254.169.254/latest/meta-data", "https://10.0.0.1/x.git",
                                 "https://[::1]/x.git", "https://0x7f.1/x.git", "ssh://git@192.168.1.1/x.git",
                                 "git@127.0.0.1:org/x.git", "https://user:pw@100.100.100.200/x.git",
                                 "https://224.0.0.1/x.git"])
def test_submit_refuses_non_public_destinations_naming_the_policy(client, tenant_key, url):
    reply = submit(client, tenant_key, repo_url=url)
    assert reply.status_code == 400, reply.json
    assert reply.json["error"].endswith(POLICY_ERROR)
    assert reply.json["detail"] == {"repo_url": ["refused by the repository destination policy"]}


def test_operator_allow_and_deny_lists_at_submit(app_config, tenant_key):
    app = create_app(dict(app_config, REPO_DESTINATIONS_ALLOW="127.0.0.1/32",
                          REPO_DESTINATIONS_DENY="deny.example.com"))
    client = app.test_client()
    assert submit(client, tenant_key, repo_url="https://127.0.0.1:8443/x.git").status_code == 201
    assert submit(client, tenant_key, repo_url="https://127.0.0.2/x.git").status_code == 400
    assert submit(client, tenant_key, repo_url="https://deny.example.com/x.git").json["error"].endswith(POLICY_ERROR)
    # Local paths stay governed by ALLOW_LOCAL_REPOS (exploop up's sample repository).
    assert submit(client, tenant_key, repo_url="file:///tmp/sample-repo").status_code == 201
    app.extensions["redis"].close()


def test_revoke_takes_no_body_as_the_document_says(client, admin_token):
    operation = client.get("/openapi.json").json["paths"]["/admin/v1/tokens/{token_id}/revoke"]["post"]
    assert operation["requestBody"]["required"] is False
    token_id = client.post("/admin/v1/tokens", headers=auth(admin_token),
                           json={"max_uses": 1, "expires": "1h"}).json["id"]
    reply = client.post(f"/admin/v1/tokens/{token_id}/revoke", headers=auth(admin_token))
    assert reply.status_code == 200 and reply.json["status"] == "revoked"
    with_reason = client.post("/admin/v1/tokens", headers=auth(admin_token), json={"max_uses": 1, "expires": "1h"})
    reply = client.post(f"/admin/v1/tokens/{with_reason.json['id']}/revoke", headers=auth(admin_token),
                        json={"reason": "leaked"})
    assert reply.status_code == 200 and reply.json["revoke_reason"] == "leaked"


def _cli(database_url: str, redis_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("EXPLOOP_SECRET_KEY")}
    environ.update(EXPLOOP_SQLALCHEMY_DATABASE_URI=database_url, EXPLOOP_REDIS_URL=redis_url, **env)
    return subprocess.run([script("exploop"), *args], env=environ, capture_output=True, text=True, timeout=120)


def test_rotate_secrets_and_the_start_refusal(app, client, admin_token, tenant_key, database_url, redis_url):
    agent = new_agent(client, admin_token)
    old = app.config["SECRET_KEY"]
    jobs = [submit(client, tenant_key).json["id"] for _ in range(3)]
    _complete_with_secret(client, agent, tenant_key, hashlib.sha256(b"x").hexdigest())
    with app.app_context():
        db.session.remove()
        db.engine.dispose()

    # No key, or keys that cannot open what is stored: the server does not start (one line).
    for env in ({}, {"EXPLOOP_SECRET_KEY": generate_key()}):
        refused = _cli(database_url, redis_url, "init-db", **env)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "EXPLOOP_SECRET_KEY" in refused.stderr and old not in refused.stderr

    new = generate_key()
    rotated = _cli(database_url, redis_url, "rotate-secrets", EXPLOOP_SECRET_KEY=f"{new},{old}")
    assert rotated.returncode == 0, rotated.stderr
    # 3 jobs' credentials (the completed one's were removed) and 1 tenant key.
    assert rotated.stdout.strip() == "re-encrypted 4, already under the newest key 0, changed meanwhile 0"
    again = _cli(database_url, redis_url, "rotate-secrets", EXPLOOP_SECRET_KEY=f"{new},{old}")
    assert again.stdout.strip() == "re-encrypted 0, already under the newest key 4, changed meanwhile 0"
    assert _cli(database_url, redis_url, "init-db", EXPLOOP_SECRET_KEY=new).returncode == 0

    fresh = create_app(dict(app.config, SECRET_KEY=new))
    init_db(fresh)
    claimed = claim(fresh.test_client(), agent, jobs[0], 1)
    assert claimed["repo_url"] == PRIVATE
    fresh.extensions["redis"].close()


def test_migration_0003_seals_and_keys_existing_rows(app_config):
    key = app_config["SECRET_KEY"]
    app = create_app(app_config)
    upgrade(app, "0002")
    plain = hashlib.sha256(b"hunter2").hexdigest()
    with app.app_context():
        db.session.execute(text("INSERT INTO tenants (id, name, key_hash, plan, created_at) VALUES"
                                " (1, 'acme', 'h', 'starter', '2026-01-01')"))
        for job_id, status in (("a" * 32, "queued"), ("b" * 32, "completed")):
            db.session.execute(text(
                "INSERT INTO jobs (id, tenant_id, capability, region, repo_url, ref, status, priority,"
                " admission_key, attempt, max_attempts, time_limit, progress, created_at) VALUES (:id, 1,"
                " 'secrets', 'us-east-1', :url, 'HEAD', :status, 'normal', '2026-01-01', 1, 3, 60, 0, '2026-01-01')"),
                {"id": job_id, "url": PRIVATE, "status": status})
        db.session.execute(text(
            "INSERT INTO findings (job_id, rule_id, severity, path, message, engine, fingerprint, secret_hash)"
            " VALUES (:job, 'r', 'high', 'p', 'm', 'detect-secrets', 'f' || :fp, :hash)"),
            {"job": "b" * 32, "fp": "0" * 31, "hash": plain})
        db.session.commit()
        db.session.remove()

    without_key = create_app(dict(app_config, SECRET_KEY=None))
    with pytest.raises(ConfigError, match="database migration 0003: repository credentials of waiting or running"
                                          " jobs must be converted with the server key; set EXPLOOP_SECRET_KEY"):
        upgrade(without_key)
    without_key.extensions["redis"].close()

    upgrade(app)
    from exploop.core.keyring import keyed_hash
    with app.app_context():
        queued, completed = db.session.get(Job, "a" * 32), db.session.get(Job, "b" * 32)
        assert queued.repo_url == completed.repo_url == SHOWN
        assert Keyring([key]).decrypt(queued.repo_credentials) == f"oauth2:{TOKEN}"
        assert completed.repo_credentials is None
        tenant_key = Keyring([key]).decrypt(db.session.get(Tenant, 1).fingerprint_key)
        finding = db.session.scalars(select(Finding)).one()
        assert finding.secret_hash == keyed_hash(tenant_key, plain)
        assert finding.fingerprint == keyed_hash(tenant_key, "f" + "0" * 31)[:32]
        db.session.remove()
        db.engine.dispose()
    app.extensions["redis"].close()


def test_a_job_whose_credentials_no_key_opens_fails_with_a_clear_error(app, app_config, client, admin_token,
                                                                        tenant_key):
    agent = new_agent(client, admin_token)
    job_id = submit(client, tenant_key).json["id"]
    other = create_app(dict(app_config, SECRET_KEY=generate_key()))  # the old key was dropped too early
    reply = other.test_client().post(f"/platform/jobs/{job_id}/claim", headers=agent, json={"attempt": 1})
    assert reply.status_code == 409 and reply.json["detail"]["reason"] == "stale"
    job = row(app, job_id)
    assert job.status == "failed" and job.repo_credentials is None
    assert job.error == "the server could not decrypt this job's repository credentials; submit the job again"
    other.extensions["redis"].close()
