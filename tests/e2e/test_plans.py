"""Plans, priorities, queue positions, cancel, bootstrap token constraints, scoped job tokens."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from exploop.core.extensions import db
from exploop.core.models import Job
from tests.support.databases import add_admin_token, add_tenant
from tests.support.stack import auth

FREE_JOB = {"repo_url": "https://github.com/acme/app.git", "capability": "secrets", "region": "us-east-1"}


def security_events(client, kind, audience) -> float:
    """Current value of the counter (counters are process-wide: tests compare deltas)."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "exploop_security_events_total" and sample.labels == {
                    "kind": kind, "audience": audience}:
                return sample.value
    return 0.0


def new_tenant(client, admin_token, name, plan):
    reply = client.post("/admin/v1/tenants", headers=auth(admin_token), json={"name": name, "plan": plan})
    assert reply.status_code == 201, reply.json
    return reply.json["api_key"]


def register(client, admin_token, **token_fields):
    token = client.post("/admin/v1/tokens", headers=auth(admin_token),
                        json={"max_uses": 5, "expires": "1h", **token_fields}).json["token"]
    return token


def agent_key(client, admin_token, region="us-east-1"):
    token = register(client, admin_token)
    return client.post("/platform/register", json={"token": token, "region": region,
                                                   "capabilities": ["secrets"]}).json["api_key"]


def run_one(client, key, job_id, attempt=1):
    """Claim and complete a job the way an agent does."""
    claimed = client.post(f"/platform/jobs/{job_id}/claim", headers=auth(key), json={"attempt": attempt})
    assert claimed.status_code == 200, claimed.json
    headers = dict(auth(key), **{"X-Job-Token": claimed.json["job_token"]})
    done = client.post(f"/platform/jobs/{job_id}/complete", headers=headers,
                       json={"attempt": attempt, "findings": [], "summary": {}})
    assert done.status_code == 200, done.json


def test_plan_limits_concurrency_and_queue_size(client, admin_token, app):
    tenant = new_tenant(client, admin_token, "small", "free")  # 2 concurrent, 10 waiting
    replies = [client.post("/api/v1/jobs", headers=auth(tenant), json=FREE_JOB) for _ in range(11)]
    statuses = [r.json["status"] for r in replies[:10]]
    assert statuses == ["queued"] * 2 + ["pending"] * 8
    refused = replies[10]
    assert refused.status_code == 429 and refused.headers["Retry-After"]
    assert "queue full" in refused.json["error"] and refused.json["detail"]["max_queue"] == 10
    with app.app_context():  # nothing half-created
        assert db.session.scalar(select(db.func.count()).select_from(Job)) == 10
    usage = client.get("/admin/v1/tenants/small", headers=auth(admin_token)).json
    assert usage["limits"] == {"max_concurrent": 2, "max_queue": 10}
    assert usage["usage"] == {"running": 0, "queued": 2, "pending": 8, "concurrent": 2, "waiting": 10}
    # A bigger plan admits more at once.
    moved = client.patch("/admin/v1/tenants/small", headers=auth(admin_token), json={"plan": "pro"})
    assert moved.status_code == 200 and moved.json["usage"]["queued"] == 10
    assert client.patch("/admin/v1/tenants/small", headers=auth(admin_token),
                        json={"plan": "gold"}).status_code == 409


def test_queue_positions_while_waiting(client, admin_token):
    tenant = new_tenant(client, admin_token, "positions", "free")
    jobs = [client.post("/api/v1/jobs", headers=auth(tenant), json=FREE_JOB).json for _ in range(4)]
    assert [j["queue_position"] for j in jobs] == [1, 2, 3, 4]
    assert [j["status"] for j in jobs] == ["queued", "queued", "pending", "pending"]
    key = agent_key(client, admin_token)
    run_one(client, key, jobs[0]["id"])  # frees a slot: the first pending job is admitted
    views = [client.get(f"/api/v1/jobs/{j['id']}", headers=auth(tenant)).json for j in jobs]
    assert [v["queue_position"] for v in views] == [None, 1, 2, 3]
    assert [v["status"] for v in views] == ["completed", "queued", "queued", "pending"]


def test_priority_orders_admission(client, admin_token):
    tenant = new_tenant(client, admin_token, "prio", "free")
    for _ in range(2):
        client.post("/api/v1/jobs", headers=auth(tenant), json=FREE_JOB)  # fill both slots
    low = client.post("/api/v1/jobs", headers=auth(tenant), json=dict(FREE_JOB, priority="low")).json
    normal = client.post("/api/v1/jobs", headers=auth(tenant), json=dict(FREE_JOB, priority="normal")).json
    critical = client.post("/api/v1/jobs", headers=auth(tenant), json=dict(FREE_JOB, priority="critical")).json
    positions = {j["priority"]: client.get(f"/api/v1/jobs/{j['id']}", headers=auth(tenant)).json["queue_position"]
                 for j in (low, normal, critical)}
    assert positions["critical"] < positions["normal"] < positions["low"]
    assert client.post("/api/v1/jobs", headers=auth(tenant),
                       json=dict(FREE_JOB, priority="urgent")).status_code == 400


def test_low_priority_job_is_admitted_under_a_stream_of_high_priority_work(app_config):
    """The bound: a low job is admitted before any job submitted more than 2 x PRIORITY_AGING
    after it with rank high (3 x for critical), however long the stream goes on."""
    from exploop.api.app import create_app, init_db

    aging = 0.5
    app = create_app(dict(app_config, PRIORITY_AGING=f"{aging}s",
                          PLANS={"one": {"max_concurrent": 1, "max_queue": 1000}}, DEFAULT_PLAN="one"))
    init_db(app)
    client = app.test_client()
    admin = add_admin_token(app)
    tenant = new_tenant(client, admin, "busy", "one")
    key = agent_key(client, admin)
    running = client.post("/api/v1/jobs", headers=auth(tenant), json=dict(FREE_JOB, priority="high")).json
    low = client.post("/api/v1/jobs", headers=auth(tenant), json=dict(FREE_JOB, priority="low")).json
    low_submitted = time.monotonic()
    admitted_after = None
    highs = []
    while time.monotonic() - low_submitted < 10:
        highs.append((time.monotonic(), client.post("/api/v1/jobs", headers=auth(tenant),
                                                    json=dict(FREE_JOB, priority="high")).json["id"]))
        run_one(client, key, running["id"])  # one slot frees: the best pending job is admitted
        queued = client.get("/api/v1/jobs", headers=auth(tenant), query_string={"status": "queued"}).json["items"]
        assert len(queued) == 1
        running = queued[0]
        if running["id"] == low["id"]:
            admitted_after = time.monotonic() - low_submitted
            break
        time.sleep(0.05)
    assert admitted_after is not None, "the low-priority job starved"
    # No high job submitted more than 2 x aging after the low one was admitted before it.
    with app.app_context():
        low_job = db.session.get(Job, low["id"])
        for _, job_id in highs:
            job = db.session.get(Job, job_id)
            if job.status in ("queued", "completed") and job.id != running["id"]:
                assert job.created_at - low_job.created_at <= __import__("datetime").timedelta(
                    seconds=2 * aging + 0.1)
    assert admitted_after < 2 * aging + 3


def test_cancel_pending_and_queued_jobs(client, admin_token):
    tenant = new_tenant(client, admin_token, "cancels", "free")
    jobs = [client.post("/api/v1/jobs", headers=auth(tenant), json=FREE_JOB).json for _ in range(3)]
    queued, _, pending = jobs
    assert pending["status"] == "pending"
    reply = client.post(f"/api/v1/jobs/{pending['id']}/cancel", headers=auth(tenant))
    assert reply.status_code == 200 and reply.json["status"] == "cancelled"
    reply = client.post(f"/api/v1/jobs/{queued['id']}/cancel", headers=auth(tenant))
    assert reply.status_code == 200 and reply.json["status"] == "cancelled"
    # Its message is still in the queue: an agent's claim of it is refused, so it never runs.
    key = agent_key(client, admin_token)
    stale = client.post(f"/platform/jobs/{queued['id']}/claim", headers=auth(key), json={"attempt": 1})
    assert stale.status_code == 409 and stale.json["detail"]["status"] == "cancelled"
    again = client.post(f"/api/v1/jobs/{queued['id']}/cancel", headers=auth(tenant))
    assert again.status_code == 409
    other = new_tenant(client, admin_token, "other", "free")
    assert client.post(f"/api/v1/jobs/{jobs[1]['id']}/cancel", headers=auth(other)).status_code == 404


def test_bootstrap_token_constraints_and_revocation_reason(client, admin_token):
    token = register(client, admin_token, region="eu-west-1", capabilities=["sast", "sca"],
                     description="eu fleet")
    body = {"token": token, "region": "us-east-1", "capabilities": ["sast"]}
    wrong_region = client.post("/platform/register", json=body)
    assert wrong_region.status_code == 403 and "region" in wrong_region.json["detail"]
    body.update(region="eu-west-1", capabilities=["sast", "secrets"])
    wrong_caps = client.post("/platform/register", json=body)
    assert wrong_caps.status_code == 403 and "secrets" in str(wrong_caps.json["detail"])
    body["capabilities"] = ["sca"]
    assert client.post("/platform/register", json=body).status_code == 201
    tokens = client.get("/admin/v1/tokens", headers=auth(admin_token)).json["items"]
    [listed] = [t for t in tokens if t["description"] == "eu fleet"]
    assert listed["region"] == "eu-west-1" and listed["capabilities"] == ["sast", "sca"]
    revoked = client.post(f"/admin/v1/tokens/{listed['id']}/revoke", headers=auth(admin_token),
                          json={"reason": "leaked in a CI log"})
    assert revoked.json["revoked_by"] == "ops" and revoked.json["revoke_reason"] == "leaked in a CI log"
    refused = client.post("/platform/register", json=body)
    assert refused.status_code == 401 and refused.json["error"] == "invalid bootstrap token: revoked"


def test_job_tokens_are_scoped_to_one_job_and_attempt_and_expire(app_config):
    from exploop.api.app import create_app, init_db

    app = create_app(dict(app_config, JOB_TIME_LIMIT="1s", JOB_TOKEN_GRACE="1s"))
    init_db(app)
    client = app.test_client()
    admin, tenant = add_admin_token(app), add_tenant(app)
    key = agent_key(client, admin)
    before = security_events(client, "invalid_token", "job")
    first, second = (client.post("/api/v1/jobs", headers=auth(tenant), json=FREE_JOB).json for _ in range(2))
    token_1 = client.post(f"/platform/jobs/{first['id']}/claim", headers=auth(key), json={"attempt": 1}).json["job_token"]
    client.post(f"/platform/jobs/{second['id']}/claim", headers=auth(key), json={"attempt": 1})
    progress = {"attempt": 1, "progress": 10}
    # The first job's token is useless for the second job, even in the right agent's hands.
    wrong = client.post(f"/platform/jobs/{second['id']}/progress",
                        headers=dict(auth(key), **{"X-Job-Token": token_1}), json=progress)
    assert wrong.status_code == 403 and "job token" in wrong.json["error"]
    ok = client.post(f"/platform/jobs/{first['id']}/progress",
                     headers=dict(auth(key), **{"X-Job-Token": token_1}), json=progress)
    assert ok.status_code == 200
    time.sleep(2.2)  # time limit 1s + grace 1s
    expired = client.post(f"/platform/jobs/{first['id']}/progress",
                          headers=dict(auth(key), **{"X-Job-Token": token_1}), json=progress)
    assert expired.status_code == 403
    assert security_events(client, "invalid_token", "job") - before == 2


def test_security_events_are_counted_by_kind(client, app):
    failed = security_events(client, "auth_failed", "tenant")
    invalid = security_events(client, "invalid_token", "bootstrap")
    for _ in range(3):
        client.get("/api/v1/jobs", headers=auth("rtenant_guess"))
    client.post("/platform/register", json={"token": "rboot_guess", "region": "us-east-1",
                                            "capabilities": ["sast"]})
    assert security_events(client, "auth_failed", "tenant") - failed == 3
    assert security_events(client, "invalid_token", "bootstrap") - invalid == 1


@pytest.mark.e2e
def test_cancel_stops_a_running_scan_and_frees_the_slot(stack):
    stack.start_api()
    tenant = stack.tenant()
    stack.start_agent("agent-c", EXPLOOP_SIMULATED_SCAN="30s", MAX_CONCURRENT_JOBS="1")
    stack.wait_agent_online("agent-c")
    long_job = stack.submit(tenant)
    stack.wait_for(lambda: stack.job(long_job)["status"] == "running", 20, "running")
    import requests
    reply = requests.post(f"{stack.url}/api/v1/jobs/{long_job}/cancel", headers=auth(tenant), timeout=10)
    assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
    cancelled_at = time.monotonic()
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-c").json()["jobs_running"] == 0
                   and "job cancelled, stopped" in stack.agents[0].output(), 10, "the agent to stop the scan")
    assert time.monotonic() - cancelled_at < 5
    assert stack.job(long_job)["status"] == "cancelled"
