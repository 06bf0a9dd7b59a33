"""The admin API behind ``exploop-admin``: credentials, roles, audit log, and scale."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from sqlalchemy import insert

from exploop.api.app import create_app
from exploop.core.extensions import db
from exploop.core.leases import LeaseStore
from exploop.core.models import Agent, AuditEvent, Job, Tenant, utcnow
from exploop.core.security import hash_token
from exploop.run.children import free_port
from tests.support.databases import add_admin_token
from tests.support.stack import auth

# --- bootstrap tokens under concurrency (a real API process) --------------------------

@pytest.mark.e2e
def test_fifty_concurrent_registrations_on_a_single_use_token(stack):
    stack.start_api(workers=2, threads=16)
    token = stack.bootstrap_token(max_uses=1)
    start = threading.Barrier(50)

    def register(n: int) -> requests.Response:
        session = requests.Session()
        session.get(stack.url + "/health", timeout=30)  # connect first: the race is the POST
        start.wait(timeout=30)
        return session.post(f"{stack.url}/platform/register", timeout=60, json={
            "token": token, "region": "us-east-1", "capabilities": ["secrets"], "name": f"racer-{n}"})

    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(register, range(50)))

    assert Counter(r.status_code for r in replies) == {201: 1, 401: 49}
    assert {r.json()["error"] for r in replies if r.status_code == 401} == {"invalid bootstrap token: used"}
    winner = [r.json() for r in replies if r.status_code == 201][0]
    assert winner["api_key"].startswith("ragent_")
    agents = stack.admin("GET", "/admin/v1/agents").json()
    assert agents["total"] == 1 and agents["items"][0]["name"] == winner["name"]
    tokens = stack.admin("GET", "/admin/v1/tokens").json()["items"]
    assert [(t["uses"], t["status"]) for t in tokens] == [(1, "used")]
    audit = stack.admin("GET", "/admin/v1/audit", params={"action": "register agent"}).json()
    assert [e["target"] for e in audit["items"]] == [winner["name"]]


# --- roles --------------------------------------------------------------------------------

READS = ["/admin/v1/agents", "/admin/v1/agents/a1", "/admin/v1/jobs", "/admin/v1/tokens",
         "/admin/v1/tenants", "/admin/v1/cluster-info", "/admin/v1/audit", "/admin/v1/admin-tokens"]
CHANGES = [("POST", "/admin/v1/tokens", {"max_uses": 1, "expires": "1h"}),
           ("POST", "/admin/v1/tokens/1/revoke", None),
           ("POST", "/admin/v1/agents", {"name": "a2", "region": "us-east-1"}),
           ("POST", "/admin/v1/agents/a1/drain", None),
           ("POST", "/admin/v1/agents/a1/uncordon", None),
           ("DELETE", "/admin/v1/agents/a1", None),
           ("POST", "/admin/v1/tenants", {"name": "t2"}),
           ("POST", "/admin/v1/jobs/x/retry", None),
           ("POST", "/admin/v1/admin-tokens", {"name": "x", "role": "admin"}),
           ("POST", "/admin/v1/admin-tokens/1/revoke", None)]


def test_viewer_reads_everything_and_changes_nothing(app, client, make_admin_token):
    admin = make_admin_token()
    viewer = make_admin_token(role="viewer", name="watcher")
    assert client.post("/admin/v1/agents", json={"name": "a1", "region": "us-east-1"},
                       headers=auth(admin)).status_code == 201
    for path in READS:
        assert client.get(path, headers=auth(viewer)).status_code == 200, path
    for method, path, body in CHANGES:
        reply = client.open(path, method=method, json=body, headers=auth(viewer))
        assert reply.status_code == 403, (method, path)
        assert reply.json["error"] == "admin token 'watcher' has role 'viewer'; this action needs 'admin'"
    assert client.get("/admin/v1/agents/a1", headers=auth(viewer)).json["desired_state"] == "active"
    denied = client.get("/admin/v1/audit", query_string={"action": "permission denied"},
                        headers=auth(admin)).json
    assert denied["total"] == len(CHANGES)
    assert {e["actor"] for e in denied["items"]} == {"watcher"}
    assert "DELETE /admin/v1/agents/a1" in {e["target"] for e in denied["items"]}


def test_unknown_and_revoked_admin_tokens(app, client, make_admin_token, make_tenant):
    admin = make_admin_token()
    for headers in ({}, auth("radmin_unknown"), auth("rtenant_x"), {"Authorization": "Basic eDp5"}):
        reply = client.get("/admin/v1/agents", headers=headers)
        assert reply.status_code == 401 and reply.json["error"] == "authentication failed"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    tenant_key = make_tenant()
    assert client.get("/admin/v1/agents", headers=auth(tenant_key)).status_code == 401

    created = client.post("/admin/v1/admin-tokens", json={"name": "contractor"}, headers=auth(admin))
    assert created.status_code == 201
    body = created.json
    assert body["role"] == "viewer" and body["status"] == "active" and body["token"].startswith("radmin_")
    listed = client.get("/admin/v1/admin-tokens", headers=auth(admin)).json["items"]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert client.get("/admin/v1/agents", headers=auth(body["token"])).status_code == 200
    revoked = client.post(f"/admin/v1/admin-tokens/{body['id']}/revoke", headers=auth(admin))
    assert revoked.status_code == 200 and revoked.json["status"] == "revoked"
    refused = client.get("/admin/v1/agents", headers=auth(body["token"]))
    assert refused.status_code == 401
    assert refused.json == {"error": "authentication failed: admin token revoked",
                            "detail": {"audience": "admin", "reason": "revoked"}}
    assert client.post("/admin/v1/admin-tokens/999/revoke", headers=auth(admin)).json["error"] == \
        "admin token 999 not found"
    actions = [e["action"] for e in client.get("/admin/v1/audit", headers=auth(admin)).json["items"]]
    assert actions[:2] == ["revoke admin token", "create admin token"]


# --- audit log ------------------------------------------------------------------------------

def test_audit_log_is_paged_newest_first_and_filtered(app, client, make_admin_token):
    admin = make_admin_token(name="alice")
    for n in range(7):
        client.post("/admin/v1/agents", json={"name": f"agent-{n}", "region": "us-east-1"},
                    headers=auth(admin))
    client.post("/admin/v1/agents/agent-3/drain", headers=auth(admin))
    client.post("/admin/v1/tokens", json={"max_uses": 2, "expires": "30m"}, headers=auth(admin))
    with app.app_context():
        db.session.add(AuditEvent(actor="bob", action="drain agent", target="agent-0",
                                  created_at=utcnow() - timedelta(days=3)))
        db.session.commit()

    page = client.get("/admin/v1/audit", query_string={"per_page": 4}, headers=auth(admin)).json
    assert page["total"] == 10 and len(page["items"]) == 4
    assert [e["action"] for e in page["items"][:2]] == ["create token", "drain agent"]
    assert page["items"][0]["actor"] == "alice" and page["items"][0]["detail"] == "max_uses=2 expires=30m"
    second = client.get("/admin/v1/audit", query_string={"per_page": 4, "page": 3}, headers=auth(admin)).json
    assert [(e["actor"], e["target"]) for e in second["items"]] == [("alice", "agent-0"), ("bob", "agent-0")]
    ids = [e["id"] for p in (1, 2, 3) for e in client.get(
        "/admin/v1/audit", query_string={"per_page": 4, "page": p}, headers=auth(admin)).json["items"]]
    assert len(ids) == len(set(ids)) == 10
    drains = client.get("/admin/v1/audit", query_string={"action": "drain agent"}, headers=auth(admin)).json
    assert [(e["actor"], e["target"]) for e in drains["items"]] == [("alice", "agent-3"), ("bob", "agent-0")]
    recent = client.get("/admin/v1/audit", query_string={"action": "drain agent", "since": "1d"},
                        headers=auth(admin)).json
    assert [e["actor"] for e in recent["items"]] == ["alice"]
    assert client.get("/admin/v1/audit", query_string={"actor": "bob"}, headers=auth(admin)).json["total"] == 1
    assert client.get("/admin/v1/audit", query_string={"target": "agent-6"},
                      headers=auth(admin)).json["items"][0]["detail"] == \
        "region=us-east-1 capabilities=sast,sca max_jobs=5"
    bad = client.get("/admin/v1/audit", query_string={"since": "yesterday"}, headers=auth(admin))
    assert bad.status_code == 400
    assert bad.json["error"] == "invalid request: since"
    assert bad.json["detail"]["since"] == ["invalid duration 'yesterday' (use e.g. 30s, 5m, 1h, 7d)"]


# --- reads behind describe, get jobs and cluster-info ------------------------------------------

def test_agent_detail_lists_its_recent_jobs_and_jobs_filter(app, client, make_admin_token):
    admin = make_admin_token()
    client.post("/admin/v1/agents", json={"name": "busy", "region": "us-east-1"}, headers=auth(admin))
    now = utcnow()
    with app.app_context():
        tenant = Tenant(name="acme", key_hash=hash_token("k"))
        db.session.add(tenant)
        db.session.flush()
        for n in range(12):
            db.session.add(Job(id=f"job{n:02d}", tenant_id=tenant.id, capability="sast", region="us-east-1",
                               repo_url="https://example.com/r.git", status="completed", time_limit=60,
                               agent_name="busy", created_at=now - timedelta(hours=n),
                               started_at=now - timedelta(hours=n) + timedelta(seconds=5)))
        db.session.add(Job(id="other", tenant_id=tenant.id, capability="sast", region="us-east-1",
                           repo_url="https://example.com/r.git", status="queued", time_limit=60,
                           created_at=now))
        db.session.commit()
    view = client.get("/admin/v1/agents/busy", headers=auth(admin)).json
    assert [j["id"] for j in view["recent_jobs"]] == [f"job{n:02d}" for n in range(10)]
    assert view["recent_jobs"][0]["tenant"] == "acme" and view["recent_jobs"][0]["started_at"].endswith("Z")

    jobs = client.get("/admin/v1/jobs", query_string={"agent": "busy", "since": "150m"},
                      headers=auth(admin)).json
    assert [j["id"] for j in jobs["items"]] == ["job00", "job01", "job02"]
    assert client.get("/admin/v1/jobs", query_string={"agent": "busy"}, headers=auth(admin)).json["total"] == 12
    assert client.get("/admin/v1/jobs", query_string={"since": "bogus"}, headers=auth(admin)).status_code == 400


def test_cluster_info_counts_agents_capacity_queues_and_jobs(app, client, redis_client, make_admin_token):
    admin = make_admin_token()
    keys = {}
    for name, region, max_jobs in (("e1", "us-east-1", 4), ("e2", "us-east-1", 6), ("w1", "eu-west-1", 8)):
        reply = client.post("/admin/v1/agents", headers=auth(admin), json={
            "name": name, "region": region, "capabilities": ["sast", "secrets"], "max_jobs": max_jobs})
        keys[name] = reply.json["api_key"]
    for name in ("e1", "e2"):  # lease bodies saying nothing runs: the job records say otherwise
        client.put("/platform/lease", headers=auth(keys[name]), json={"jobs_running": 0})
    client.post("/admin/v1/agents/e2/drain", headers=auth(admin))
    redis_client.rpush("sast.us-east-1", "m1", "m2")
    with app.app_context():
        tenant = Tenant(name="acme", key_hash=hash_token("k"))
        db.session.add(tenant)
        db.session.flush()
        agent_ids = dict(db.session.execute(db.select(Agent.name, Agent.id)).all())
        jobs = [("e1", "running")] * 3 + [("e2", "running"), (None, "queued")]
        for n, (agent, status) in enumerate(jobs):
            db.session.add(Job(id=f"job{n}", tenant_id=tenant.id, capability="sast",
                               region="eu-west-1" if agent is None else "us-east-1",
                               repo_url="https://example.com/r.git", status=status, time_limit=60,
                               agent_id=agent_ids.get(agent), agent_name=agent))
        db.session.commit()

    info = client.get("/admin/v1/cluster-info", headers=auth(admin)).json
    assert info["api"] == "ok" and info["database"] == "ok" and info["redis"] == "ok"
    assert "degraded" not in info
    assert info["agents"]["total"] == 3
    assert info["agents"]["by_status"] == {"online": 1, "draining": 1, "offline": 1}
    east = info["agents"]["by_region"]["us-east-1"]
    assert (east["online"], east["draining"], east["jobs_running"], east["capacity"]) == (1, 1, 4, 4)
    assert info["capacity"] == {"used": 4, "total": 4}
    assert info["queues"]["sast.us-east-1"] == 2 and info["queues"]["secrets.eu-west-1"] == 0
    # Consumers are online agents: e2 is draining, w1 offline.
    assert info["consumers"]["sast.us-east-1"] == 1 and info["consumers"]["secrets.eu-west-1"] == 0
    # A job waits for sast.eu-west-1 (its record says queued) and nobody consumes it.
    assert info["unconsumed"] == ["sast.eu-west-1"]
    assert info["jobs"] == {"pending": 0, "queued": 1, "running": 4, "failed_24h": 0, "completed_24h": 0}


def test_cluster_info_with_redis_down_reports_it(app_config):
    dead = create_app(dict(app_config, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    from exploop.api.app import init_db
    init_db(dead)
    admin = add_admin_token(dead)
    client = dead.test_client()
    client.post("/admin/v1/agents", json={"name": "a", "region": "us-east-1"}, headers=auth(admin))
    reply = client.get("/admin/v1/cluster-info", headers=auth(admin))
    assert reply.status_code == 200
    info = reply.json
    assert info["redis"].startswith("error: ") and info["database"] == "ok"
    assert info["agents"]["by_status"] == {"unknown": 1}
    assert set(info["queues"].values()) == {None} and set(info["consumers"].values()) == {None}
    assert "agent status, queue depths and consumers unknown" in info["degraded"]
    listed = client.get("/admin/v1/agents", headers=auth(admin)).json
    assert [a["status"] for a in listed["items"]] == ["unknown"] and "Redis unreadable" in listed["degraded"]
    with dead.app_context():
        db.session.remove()
        db.engine.dispose()


def test_server_timing_and_openapi(client, app, make_admin_token):
    admin = make_admin_token()
    reply = client.get("/admin/v1/agents", headers=auth(admin))
    assert reply.headers["Server-Timing"].startswith("app;dur=")
    spec = client.get("/openapi.json").json
    for path in ("/admin/v1/audit", "/admin/v1/admin-tokens", "/admin/v1/admin-tokens/{token_id}/revoke",
                 "/admin/v1/cluster-info"):
        assert path in spec["paths"], path
    cluster = spec["paths"]["/admin/v1/cluster-info"]["get"]["responses"]["200"]
    assert cluster["content"]["application/json"]["schema"]["$ref"].endswith("/ClusterInfoOut")
    params = {p["name"] for p in spec["paths"]["/admin/v1/jobs"]["get"]["parameters"]}
    assert {"status", "tenant", "agent", "since", "page", "per_page"} <= params


# --- scale: a page of agents is one query and one batched Redis read ------------------------------

def test_agent_pages_read_leases_in_one_batch(app, client, redis_client, make_admin_token):
    admin = make_admin_token()
    now = utcnow()
    with app.app_context():
        db.session.execute(insert(Agent), [
            {"name": f"agent-{n:04d}", "region": "us-east-1", "capabilities": "sast", "max_jobs": 5,
             "key_hash": hash_token(f"k{n}"), "desired_state": "active", "disabled": False,
             "created_at": now} for n in range(1200)])
        db.session.commit()
    pipe = redis_client.pipeline()
    for n in range(0, 1200, 2):
        pipe.set(LeaseStore.key(f"agent-{n:04d}"), json.dumps(
            {"jobs_running": 1, "max_jobs": 5, "running_jobs": ["j"], "renewed_at": time.time()}), ex=60)
    pipe.execute()

    redis_client.config_resetstat()
    page = client.get("/admin/v1/agents", query_string={"per_page": 500, "page": 2}, headers=auth(admin)).json
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1 and "cmdstat_get" not in stats
    assert page["total"] == 1200 and len(page["items"]) == 500
    assert page["items"][0]["name"] == "agent-0500" and page["items"][0]["status"] == "online"
    assert page["items"][1]["status"] == "offline" and page["items"][0]["lease_ttl"] > 0

    names, number = [], 1
    while True:
        body = client.get("/admin/v1/agents", query_string={"per_page": 500, "page": number},
                          headers=auth(admin)).json
        names += [a["name"] for a in body["items"]]
        if len(names) >= body["total"]:
            break
        number += 1
    assert names == [f"agent-{n:04d}" for n in range(1200)]
    assert client.get("/admin/v1/agents", query_string={"per_page": 501},
                      headers=auth(admin)).status_code == 400
