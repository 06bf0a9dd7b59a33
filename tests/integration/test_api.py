"""The API through Flask's test client, on a real database and a real Redis."""
from __future__ import annotations

import json
import time

import pytest
from kombu import Connection

from exploop.core.extensions import db
from tests.support.stack import auth


def register(client, admin_token, **fields):
    token = client.post("/admin/v1/tokens", headers=auth(admin_token),
                        json={"max_uses": 1, "expires": "1h"}).json["token"]
    body = {"token": token, "region": "us-east-1", "capabilities": ["secrets", "sast"], **fields}
    reply = client.post("/platform/register", json=body)
    assert reply.status_code == 201, reply.json
    return reply.json


def renew(client, key, **body):
    return client.put("/platform/lease", headers=auth(key), json={"heartbeat_interval": 10, **body})


def submit(client, tenant_key, **fields):
    body = {"repo_url": "https://github.com/acme/app.git", "capability": "secrets",
            "region": "us-east-1", **fields}
    return client.post("/api/v1/jobs", headers=auth(tenant_key), json=body)


def queued_messages(redis_url, queue):
    with Connection(redis_url) as conn:
        client = conn.default_channel.client
        return [json.loads(m) for m in client.lrange(queue, 0, -1)]


def test_health_checks_database_and_redis(client):
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json == {"status": "ok", "database": "ok", "redis": "ok"}


def test_health_reports_redis_down(app_config):
    from exploop.api.app import create_app
    app = create_app(dict(app_config, REDIS_URL="redis://127.0.0.1:1/0"))
    reply = app.test_client().get("/health")
    assert reply.status_code == 503
    assert reply.json["redis"].startswith("error") and reply.json["database"] == "ok"


def test_openapi_document_lists_every_audience(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for path in ("/platform/lease", "/platform/jobs/{job_id}/claim", "/api/v1/jobs",
                 "/admin/v1/agents"):
        assert path in spec["paths"]


def test_register_and_lease_returns_ttl_and_desired_state(client, admin_token, redis_client):
    agent = register(client, admin_token, name="agent-us-east-1")
    assert agent["api_key"].startswith("ragent_") and agent["name"] == "agent-us-east-1"
    reply = renew(client, agent["api_key"], jobs_running=1, max_jobs=5, running_jobs=["j1"])
    assert reply.status_code == 200
    assert reply.json == {"agent": "agent-us-east-1", "desired_state": "active", "lease_ttl": 30}
    assert 0 < redis_client.ttl("exploop:lease:agent-us-east-1") <= 30
    listed = client.get("/admin/v1/agents", headers=auth(admin_token)).json["items"]
    # Running jobs come from the job records, not from what the lease body says.
    assert [(a["name"], a["status"], a["jobs_running"], a["running_jobs"], a["max_jobs"]) for a in listed] == [
        ("agent-us-east-1", "online", 0, [], 5)]


def test_bootstrap_token_is_single_use_and_stored_hashed(client, admin_token, app):
    created = client.post("/admin/v1/tokens", headers=auth(admin_token),
                          json={"max_uses": 1, "expires": "1h"}).json
    body = {"token": created["token"], "region": "us-east-1", "capabilities": ["sast"]}
    assert client.post("/platform/register", json=body).status_code == 201
    again = client.post("/platform/register", json=body)
    assert again.status_code == 401 and again.json["error"] == "invalid bootstrap token: used"
    with app.app_context():
        from exploop.core.models import BootstrapToken
        assert all(created["token"] not in (t.token_hash, t.prefix)
                   for t in db.session.scalars(db.select(BootstrapToken)))


def test_expired_and_unknown_bootstrap_tokens_are_refused(client, admin_token):
    created = client.post("/admin/v1/tokens", headers=auth(admin_token),
                          json={"max_uses": 5, "expires": "1s"}).json
    time.sleep(1.2)
    body = {"token": created["token"], "region": "us-east-1", "capabilities": ["sast"]}
    assert client.post("/platform/register", json=body).json["error"] == "invalid bootstrap token: expired"
    body["token"] = "rboot_nope"
    assert client.post("/platform/register", json=body).json["error"] == "invalid bootstrap token"


def test_job_is_published_after_commit_with_job_id_and_attempt(client, admin_token, tenant_key, redis_url):
    reply = submit(client, tenant_key)
    assert reply.status_code == 201, reply.json
    job = reply.json
    assert job["status"] == "queued" and job["attempt"] == 1 and job["region"] == "us-east-1"
    [message] = queued_messages(redis_url, "secrets.us-east-1")
    assert message["headers"]["task"] == "exploop.run_scan"


def test_claim_guard_allows_only_the_current_attempt_once(client, admin_token, tenant_key):
    agent = register(client, admin_token)
    other = register(client, admin_token)
    job_id = submit(client, tenant_key).json["id"]
    key, other_key = auth(agent["api_key"]), auth(other["api_key"])
    assert client.post(f"/platform/jobs/{job_id}/claim", headers=key, json={"attempt": 2}).status_code == 409
    claimed = client.post(f"/platform/jobs/{job_id}/claim", headers=key, json={"attempt": 1})
    assert claimed.status_code == 200 and claimed.json["repo_url"].endswith("app.git")
    token = claimed.json["job_token"]
    assert token.startswith("rjob_")
    duplicate = client.post(f"/platform/jobs/{job_id}/claim", headers=other_key, json={"attempt": 1})
    assert duplicate.status_code == 409 and duplicate.json["detail"]["status"] == "running"
    # Only the holder reports, and only with the job token.
    done = {"attempt": 1, "findings": [], "summary": {}}
    holder = dict(key, **{"X-Job-Token": token})
    stolen = dict(other_key, **{"X-Job-Token": token})
    assert client.post(f"/platform/jobs/{job_id}/complete", headers=stolen, json=done).status_code == 403
    assert client.post(f"/platform/jobs/{job_id}/complete", headers=key, json=done).status_code == 403
    assert client.post(f"/platform/jobs/{job_id}/progress", headers=holder,
                       json={"attempt": 1, "progress": 50}).status_code == 200
    assert client.post(f"/platform/jobs/{job_id}/complete", headers=holder, json=done).status_code == 200
    # A retried completion whose answer was lost is harmless.
    assert client.post(f"/platform/jobs/{job_id}/complete", headers=holder, json=done).status_code == 200
    assert client.get(f"/api/v1/jobs/{job_id}", headers=auth(tenant_key)).json["status"] == "completed"


def test_failed_attempt_with_retry_is_requeued_then_fails_permanently(client, admin_token, tenant_key, redis_url):
    agent = register(client, admin_token)
    key = auth(agent["api_key"])
    job_id = submit(client, tenant_key).json["id"]
    for attempt in (1, 2, 3):
        claimed = client.post(f"/platform/jobs/{job_id}/claim", headers=key, json={"attempt": attempt})
        assert claimed.status_code == 200
        reply = client.post(f"/platform/jobs/{job_id}/fail", headers=dict(key, **{"X-Job-Token": claimed.json["job_token"]}),
                            json={"attempt": attempt, "error": "scanner crashed", "retry": True})
        assert reply.status_code == 200
    job = client.get(f"/api/v1/jobs/{job_id}", headers=auth(tenant_key)).json
    assert job["status"] == "failed" and job["attempt"] == 3 and "scanner crashed" in job["error"]
    attempts = [m["headers"]["argsrepr"] for m in queued_messages(redis_url, "secrets.us-east-1")]
    assert len(attempts) == 3  # one message per attempt


def test_failed_publish_leaves_the_job_pending_not_lost(app_config, tenant_key):
    from exploop.api.app import create_app, init_db
    app = create_app(dict(app_config, CELERY={"broker_url": "redis://127.0.0.1:1/0"}))
    init_db(app)
    client = app.test_client()
    reply = submit(client, tenant_key)
    assert reply.status_code == 201
    assert reply.json["status"] == "pending" and "publish failed" in reply.json["error"]
    assert client.get(f"/api/v1/jobs/{reply.json['id']}", headers=auth(tenant_key)).json["status"] == "pending"


def test_idempotency_key_returns_the_same_job(client, tenant_key):
    headers = dict(auth(tenant_key), **{"Idempotency-Key": "abc-123"})
    body = {"repo_url": "https://github.com/acme/app.git", "capability": "secrets", "region": "us-east-1"}
    first = client.post("/api/v1/jobs", headers=headers, json=body)
    second = client.post("/api/v1/jobs", headers=headers, json=body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json["id"] == second.json["id"]
    assert client.get("/api/v1/jobs", headers=auth(tenant_key)).json["total"] == 1


def test_region_defaults_to_a_live_agents_region(client, admin_token, tenant_key):
    assert submit(client, tenant_key, region=None).status_code == 400  # null is not a region
    body = {"repo_url": "https://github.com/acme/app.git", "capability": "secrets"}
    refused = client.post("/api/v1/jobs", headers=auth(tenant_key), json=body)
    assert refused.status_code == 409 and "no live agent" in refused.json["error"]
    agent = register(client, admin_token, region="eu-west-1")
    renew(client, agent["api_key"])
    chosen = client.post("/api/v1/jobs", headers=auth(tenant_key), json=body)
    assert chosen.status_code == 201 and chosen.json["region"] == "eu-west-1"


@pytest.mark.parametrize("body,field", [
    ({"capability": "secrets"}, "repo_url"),
    ({"repo_url": "https://x/y", "capability": "dast"}, "capability"),
    ({"repo_url": "https://x/y", "capability": "secrets", "region": "Nowhere 1"}, "region"),
    ({"repo_url": "https://x/y", "capability": "secrets", "extra": 1}, "extra"),
    ({"repo_url": 5, "capability": "secrets"}, "repo_url"),
])
def test_invalid_fields_are_400_naming_the_field(client, tenant_key, body, field):
    reply = client.post("/api/v1/jobs", headers=auth(tenant_key), json=body)
    assert reply.status_code == 400
    assert field in reply.json["detail"] and field in reply.json["error"]


def test_unknown_capability_lists_the_valid_ones(client, tenant_key):
    reply = submit(client, tenant_key, capability="dast")
    assert reply.status_code == 400
    assert "sast, sca, secrets" in json.dumps(reply.json["detail"])


@pytest.mark.parametrize("url", ["http://github.com/a/b", "ftp://x/y", "/etc/passwd", "git://x/y"])
def test_unsupported_repo_urls_are_refused(client, tenant_key, url):
    reply = submit(client, tenant_key, repo_url=url)
    assert reply.status_code == 400 and "repo_url" in reply.json["detail"]


def test_unknown_region_is_refused(client, tenant_key):
    reply = submit(client, tenant_key, region="mars-1")
    assert reply.status_code == 400 and "us-east-1" in json.dumps(reply.json["detail"])


def test_invalid_json_is_400(client, tenant_key):
    reply = client.post("/api/v1/jobs", headers=dict(auth(tenant_key), **{"Content-Type": "application/json"}),
                        data="{not json")
    assert reply.status_code == 400 and reply.is_json and "error" in reply.json


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer rtenant_wrong"},
                                     {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}])
def test_missing_or_invalid_credentials_are_401(client, headers):
    reply = client.get("/api/v1/jobs", headers=headers)
    assert reply.status_code == 401 and reply.json["error"] == "authentication failed"


def test_credentials_of_one_audience_do_not_open_another(client, admin_token, tenant_key):
    agent = register(client, admin_token)
    assert client.get("/api/v1/jobs", headers=auth(agent["api_key"])).status_code == 401
    assert client.get("/admin/v1/agents", headers=auth(tenant_key)).status_code == 401
    assert client.put("/platform/lease", headers=auth(admin_token), json={}).status_code == 401


def test_another_tenants_job_is_404(client, app, tenant_key, make_tenant):
    other = make_tenant("globex")
    job_id = submit(client, tenant_key).json["id"]
    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/findings"):
        assert client.get(path, headers=auth(other)).status_code == 404
    assert client.get("/api/v1/jobs", headers=auth(other)).json["total"] == 0


def test_viewer_cannot_change_anything(client, app, make_admin_token):
    viewer = make_admin_token(role="viewer", name="auditor")
    assert client.get("/admin/v1/agents", headers=auth(viewer)).status_code == 200
    reply = client.post("/admin/v1/tenants", headers=auth(viewer), json={"name": "x"})
    assert reply.status_code == 403 and "viewer" in reply.json["error"]


def test_deleted_agent_key_stops_working_at_once(client, admin_token):
    agent = register(client, admin_token, name="agent-gone")
    assert renew(client, agent["api_key"]).status_code == 200
    assert client.delete("/admin/v1/agents/agent-gone", headers=auth(admin_token)).status_code == 204
    assert renew(client, agent["api_key"]).status_code == 401


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").json["error"]
    reply = client.delete("/api/v1/jobs")
    assert reply.status_code == 405 and reply.json["error"]


def test_paging_is_bounded(client, tenant_key):
    assert client.get("/api/v1/jobs?per_page=100000", headers=auth(tenant_key)).status_code == 400
    assert client.get("/api/v1/jobs?page=0", headers=auth(tenant_key)).status_code == 400


def test_redis_down_is_a_503_not_a_500(app_config, tenant_key):
    from exploop.api.app import create_app
    app = create_app(dict(app_config, REDIS_URL="redis://127.0.0.1:1/0"))
    client = app.test_client()
    reply = client.put("/platform/lease", headers=auth("ragent_whoever"), json={"heartbeat_interval": 10})
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "5"
    assert reply.json["error"] == "service unavailable: redis is unreachable"
