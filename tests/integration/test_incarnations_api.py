"""The API's side of agent incarnations, lost jobs, graceful stops and disabled agents
(in-process Flask client on a real Redis and database; the process-level tests are in
test_recovery.py and test_agent_states.py)."""
from __future__ import annotations


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def register(client, admin_token, name: str) -> dict:
    token = client.post("/admin/v1/tokens", headers=auth(admin_token),
                        json={"max_uses": 1, "expires": "1h"}).json["token"]
    reply = client.post("/platform/register", json={"token": token, "name": name, "region": "us-east-1",
                                                     "capabilities": ["secrets"]})
    assert reply.status_code == 201, reply.json
    return reply.json


def renew(client, key, **body):
    return client.put("/platform/lease", headers=auth(key), json={"heartbeat_interval": 10, **body})


def submit(client, tenant_key):
    return client.post("/api/v1/jobs", headers=auth(tenant_key), json={
        "repo_url": "https://github.com/acme/app.git", "capability": "secrets", "region": "us-east-1"})


def claim(client, key, job_id, attempt=1, **body):
    return client.post(f"/platform/jobs/{job_id}/claim", headers=auth(key), json={"attempt": attempt, **body})


def job(client, admin_token, job_id) -> dict:
    return client.get(f"/admin/v1/jobs/{job_id}", headers=auth(admin_token)).json


def agent_view(client, admin_token, name) -> dict:
    return client.get(f"/admin/v1/agents/{name}", headers=auth(admin_token)).json


def test_a_new_incarnation_requeues_what_the_previous_one_held(client, admin_token, tenant_key):
    key = register(client, admin_token, name="agent-a")["api_key"]
    assert renew(client, key, incarnation="first").status_code == 200
    held = submit(client, tenant_key).json["id"]
    assert claim(client, key, held, incarnation="first").status_code == 200
    # The same incarnation renewing (cached path) keeps its job.
    assert renew(client, key, incarnation="first").status_code == 200
    assert job(client, admin_token, held)["status"] == "running"
    # A restart: the first renewal of the new incarnation requeues at once.
    assert renew(client, key, incarnation="second").status_code == 200
    after = job(client, admin_token, held)
    assert after["status"] == "queued" and after["attempt"] == 2
    assert "agent agent-a restarted" in after["error"]
    # Its own claim of the new attempt is kept by later renewals.
    assert claim(client, key, held, attempt=2, incarnation="second").status_code == 200
    assert renew(client, key, incarnation="second").status_code == 200
    assert job(client, admin_token, held)["status"] == "running"


def test_a_claim_from_a_new_incarnation_also_releases_the_old_jobs(client, admin_token, tenant_key):
    key = register(client, admin_token, name="agent-a")["api_key"]
    old, new = submit(client, tenant_key).json["id"], submit(client, tenant_key).json["id"]
    assert claim(client, key, old, incarnation="first").status_code == 200
    assert claim(client, key, new, incarnation="second").status_code == 200  # before any renewal
    assert job(client, admin_token, old)["attempt"] == 2
    assert job(client, admin_token, new)["status"] == "running"


def test_lost_jobs_reported_with_a_renewal_are_requeued_at_once(client, admin_token, tenant_key):
    key = register(client, admin_token, name="agent-a")["api_key"]
    other = register(client, admin_token, name="agent-b")["api_key"]
    lost, theirs = submit(client, tenant_key).json["id"], submit(client, tenant_key).json["id"]
    assert claim(client, key, lost, incarnation="i").status_code == 200
    assert claim(client, other, theirs, incarnation="j").status_code == 200
    reported = [{"job_id": lost, "attempt": 1, "reason": "worker process died: signal 9"},
                {"job_id": theirs, "attempt": 1}]  # not agent-a's: ignored
    assert renew(client, key, incarnation="i", lost_jobs=reported).status_code == 200
    assert job(client, admin_token, lost)["attempt"] == 2
    assert "worker process died: signal 9" in job(client, admin_token, lost)["error"]
    assert job(client, admin_token, theirs)["status"] == "running"


def test_a_graceful_stop_is_offline_stopped_and_a_renewal_clears_it(client, admin_token):
    key = register(client, admin_token, name="agent-a")["api_key"]
    assert renew(client, key, status="stopping").status_code == 200
    assert agent_view(client, admin_token, "agent-a")["status"] == "stopping"
    assert client.delete("/platform/lease", headers=auth(key)).status_code == 204
    view = agent_view(client, admin_token, "agent-a")
    assert view["status"] == "offline" and view["stopped_at"] is not None
    assert renew(client, key).status_code == 200
    view = agent_view(client, admin_token, "agent-a")
    assert view["status"] == "online" and view["stopped_at"] is None


def test_the_status_filter_tells_a_stopping_agent_from_an_online_one(client, admin_token):
    """``get agents --status`` decides from lease presence without decoding bodies; a stopping
    agent's lease says so in its first bytes, so it is listed as stopping, never as online."""
    keys = {name: register(client, admin_token, name=name)["api_key"] for name in ("agent-a", "agent-b", "agent-c")}
    assert renew(client, keys["agent-a"]).status_code == 200
    assert renew(client, keys["agent-b"], status="stopping").status_code == 200

    def listed(status: str) -> list[tuple[str, str]]:
        reply = client.get("/admin/v1/agents", query_string={"status": status}, headers=auth(admin_token))
        assert reply.status_code == 200, reply.json
        assert reply.json["total"] == len(reply.json["items"])
        return [(item["name"], item["status"]) for item in reply.json["items"]]
    assert listed("online") == [("agent-a", "online")]
    assert listed("stopping") == [("agent-b", "stopping")]
    assert listed("offline") == [("agent-c", "offline")]
    assert renew(client, keys["agent-b"]).status_code == 200  # it came back: online again
    assert listed("online") == [("agent-a", "online"), ("agent-b", "online")]
    assert listed("stopping") == []


def test_disable_refuses_leases_and_claims_and_requeues_running_jobs(client, admin_token, tenant_key):
    key = register(client, admin_token, name="agent-a")["api_key"]
    assert renew(client, key).status_code == 200
    running, waiting = submit(client, tenant_key).json["id"], submit(client, tenant_key).json["id"]
    assert claim(client, key, running).status_code == 200
    reply = client.post("/admin/v1/agents/agent-a/disable", headers=auth(admin_token))
    assert reply.status_code == 200 and reply.json["status"] == "disabled"
    assert job(client, admin_token, running)["attempt"] == 2
    for refused in (renew(client, key), claim(client, key, waiting)):
        assert refused.status_code == 403 and refused.json["detail"] == {"reason": "disabled"}
        assert refused.json["error"].startswith("agent 'agent-a' is disabled by an admin")
    assert client.get("/admin/v1/agents?status=disabled", headers=auth(admin_token)).json["total"] == 1
    reply = client.post("/admin/v1/agents/agent-a/enable", headers=auth(admin_token))
    assert reply.status_code == 200 and reply.json["status"] == "offline"  # no lease yet
    assert renew(client, key).status_code == 200
    assert claim(client, key, waiting).status_code == 200
    assert agent_view(client, admin_token, "agent-a")["status"] == "online"
    assert client.post("/admin/v1/agents/nobody/disable", headers=auth(admin_token)).status_code == 404
