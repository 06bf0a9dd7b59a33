"""The isolation matrix, derived from /openapi.json (checked against the url_map), so a new
endpoint is in it the day it is added:

- every tenant endpoint on another tenant's objects answers 404 (existence does not leak);
- every platform job endpoint, for an agent that does not hold the job, answers 403
  (claim: 409, a duplicate delivery, or 403 outside the agent's capabilities or region);
- a viewer admin token changes nothing: every admin POST/PUT/DELETE answers 403;
- each audience's credential opens no other audience's endpoints (401), nor does none.
"""
from __future__ import annotations

import re

import pytest

from tests.support.openapi import CONSOLE_PREFIX, NOT_OPERATIONS, Operation, operations
from tests.support.stack import auth


@pytest.fixture
def app_config(app_config):
    # Hundreds of deliberate 401s from one address: keep the brute-force limit out of reach
    # (tests/e2e/test_limits.py covers it).
    return dict(app_config, AUTH_FAILURE_LIMIT=1_000_000)


@pytest.fixture
def document(client):
    return client.get("/openapi.json").json


@pytest.fixture
def ops(document) -> list[Operation]:
    return operations(document)


def _resolve(document: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


_SAMPLES = ("x1", "1h", "us-east-1", "sast")


def minimal(document: dict, schema: dict):
    """The smallest value a schema accepts: required properties only, lower bounds, first enum."""
    schema = _resolve(document, schema)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {name: minimal(document, schema["properties"][name])
                for name in schema.get("required", [])}
    if kind == "array":
        return [minimal(document, schema["items"]) for _ in range(schema.get("minItems", 0))]
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return max(schema.get("minimum", 1), 1)
    if kind == "boolean":
        return False
    pattern = schema.get("pattern")
    return next(s for s in _SAMPLES if pattern is None or re.fullmatch(pattern.strip("^$"), s))


def call(client, document: dict, op: Operation, token: str | None, **params):
    """Call ``op`` with a schema-valid body, so the answer is about access, not input."""
    body = None
    if "requestBody" in op.spec:
        schema = op.spec["requestBody"]["content"]["application/json"]["schema"]
        body = minimal(document, schema)
    return client.open(op.url(**params), method=op.method, json=body,
                       headers=auth(token) if token else {})


def test_document_and_url_map_list_the_same_operations(app, ops):
    documented = {(op.method, op.path) for op in ops}
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_OPERATIONS or rule.endpoint.startswith(CONSOLE_PREFIX):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routed |= {(m, path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert documented == routed


def test_every_endpoint_names_its_audience(ops):
    public = {("POST", "/platform/register"), ("GET", "/health"), ("GET", "/metrics")}
    for op in ops:
        if (op.method, op.path) in public:
            assert op.audience is None, op
            continue
        expected = {"platform": "agent", "api": "tenant", "admin": "admin"}[op.path.split("/")[1]]
        assert op.audience == expected, op
        if op.audience == "admin":
            # Reads for viewers and admins, changes for admins only.
            assert op.role == ("admin" if op.changes else "viewer"), op


@pytest.fixture
def world(app, client, make_admin_token, make_tenant):
    """Tenants A and B, agents A and B (all capabilities), a job of A running on agent A with a
    finding, admin and viewer tokens, a bootstrap token."""
    admin = make_admin_token()
    viewer = make_admin_token(role="viewer", name="watcher")
    tenant_a, tenant_b = make_tenant("tenant-a"), make_tenant("tenant-b")
    agents = {}
    for name in ("agent-a", "agent-b"):
        reply = client.post("/admin/v1/agents", headers=auth(admin), json={
            "name": name, "region": "us-east-1", "capabilities": ["sast", "sca", "secrets"]})
        agents[name] = reply.json["api_key"]
    body = {"repo_url": "https://git.example.invalid/a.git", "capability": "secrets", "region": "us-east-1"}
    job = client.post("/api/v1/jobs", headers=dict(auth(tenant_a), **{"Idempotency-Key": "k1"}), json=body).json
    queued = client.post("/api/v1/jobs", headers=auth(tenant_a), json=body).json
    claimed = client.post(f"/platform/jobs/{job['id']}/claim", headers=auth(agents["agent-a"]),
                          json={"attempt": 1})
    assert claimed.status_code == 200
    job_token = claimed.json["job_token"]
    assert client.post(f"/platform/jobs/{job['id']}/progress",
                       headers=dict(auth(agents["agent-a"]), **{"X-Job-Token": job_token}),
                       json={"attempt": 1, "progress": 10}).status_code == 200
    token = client.post("/admin/v1/tokens", headers=auth(admin), json={"max_uses": 1}).json
    return {"admin": admin, "viewer": viewer, "tenant_a": tenant_a, "tenant_b": tenant_b,
            "agent_a": agents["agent-a"], "agent_b": agents["agent-b"], "job": job["id"],
            "queued": queued["id"], "token_id": token["id"], "name": "agent-a", "job_token": job_token}


def test_tenant_b_gets_404_on_every_endpoint_of_tenant_a_objects(client, document, ops, world):
    tenant_ops = [op for op in ops if op.audience == "tenant"]
    # Changes last (cancel ends the job), so every read sees it running.
    on_objects = sorted((op for op in tenant_ops if op.params), key=lambda op: op.changes)
    assert on_objects, "no tenant endpoint takes an object id"
    for op in on_objects:
        assert op.params == ["job_id"], f"{op}: add its object to this matrix"
        own = call(client, document, op, world["tenant_a"], job_id=world["job"])
        # A's own job answers A (SARIF of a job still running is a 409 about its state).
        assert own.status_code < 400 or (op.path.endswith("/sarif") and own.status_code == 409), (op, own.json)
        other = call(client, document, op, world["tenant_b"], job_id=world["job"])
        assert other.status_code == 404, (op, other.json)
        # The same answer as for a job that does not exist: nothing tells them apart.
        missing = call(client, document, op, world["tenant_b"], job_id="0" * 32)
        assert other.json["error"].replace(world["job"], "ID") == missing.json["error"].replace("0" * 32, "ID")
    # Endpoints without an id: B's lists never show A's jobs, A's idempotency keys are A's.
    listed = client.get("/api/v1/jobs", headers=auth(world["tenant_b"])).json
    assert listed["total"] == 0 and listed["items"] == []
    body = {"repo_url": "https://git.example.invalid/b.git", "capability": "secrets", "region": "us-east-1"}
    mine = client.post("/api/v1/jobs", headers=dict(auth(world["tenant_b"]), **{"Idempotency-Key": "k1"}),
                       json=body)
    assert mine.status_code == 201 and mine.json["id"] != world["job"]


def test_agent_gets_403_on_every_job_endpoint_for_a_job_it_does_not_hold(client, document, ops, world):
    job_ops = [op for op in ops if op.audience == "agent" and op.path.startswith("/platform/jobs/{job_id}/")]
    assert {op.path.rsplit("/", 1)[1] for op in job_ops} >= {"claim", "progress", "complete", "fail"}
    before = client.get(f"/api/v1/jobs/{world['job']}", headers=auth(world["tenant_a"])).json
    for op in job_ops:
        reply = call(client, document, op, world["agent_b"], job_id=world["job"])
        if op.path.endswith("/claim"):
            # Taking a job is how an agent comes to hold it: a job already held by another
            # agent is a duplicate delivery (409); refusing outright is for a job outside
            # the agent's capabilities or region (below).
            assert reply.status_code == 409 and reply.json["detail"]["reason"] == "stale", (op, reply.json)
            continue
        assert reply.status_code == 403, (op, reply.json)
        assert "does not hold" in reply.json["error"]
        # Nor with the holder's job token, stolen.
        stolen = client.post(op.url(job_id=world["job"]), json={"attempt": 1, "progress": 1, "error": "x"},
                             headers=dict(auth(world["agent_b"]), **{"X-Job-Token": world["job_token"]}))
        assert stolen.status_code == 403, (op, stolen.json)
        # Nor on a job nobody holds yet.
        queued = call(client, document, op, world["agent_b"], job_id=world["queued"])
        assert queued.status_code == 403, (op, queued.json)
    after = client.get(f"/api/v1/jobs/{world['job']}", headers=auth(world["tenant_a"])).json
    assert after == before and after["agent"] == "agent-a" and after["status"] == "running"


def test_claim_outside_the_agents_capabilities_is_403(app, client, world):
    admin = world["admin"]
    key = client.post("/admin/v1/agents", headers=auth(admin), json={
        "name": "sast-only", "region": "us-east-1", "capabilities": ["sast"]}).json["api_key"]
    reply = client.post(f"/platform/jobs/{world['queued']}/claim", headers=auth(key), json={"attempt": 1})
    assert reply.status_code == 403 and "cannot run secrets jobs" in reply.json["error"]


def test_viewer_token_changes_nothing(client, document, ops, world):
    changes = [op for op in ops if op.audience == "admin" and op.changes]
    assert len(changes) >= 10
    snapshot = _admin_state(client, world)
    for op in changes:
        reply = call(client, document, op, world["viewer"], job_id=world["job"], name=world["name"],
                     token_id=world["token_id"])
        assert reply.status_code == 403, (op, reply.json)
        assert "needs 'admin'" in reply.json["error"]
    assert _admin_state(client, world) == snapshot
    # Every refusal is in the audit log.
    denied = client.get("/admin/v1/audit", query_string={"action": "permission denied", "per_page": 500},
                        headers=auth(world["admin"])).json
    assert denied["total"] == len(changes)


def _admin_state(client, world) -> dict:
    headers = auth(world["admin"])
    state = {}
    for path in ("/admin/v1/tenants", "/admin/v1/tokens", "/admin/v1/agents", "/admin/v1/jobs",
                 "/admin/v1/admin-tokens"):
        items = client.get(path, query_string={"per_page": 500}, headers=headers).json["items"]
        for item in items:  # live values that move on their own
            for key in ("last_seen", "last_seen_seconds", "lease_ttl"):
                item.pop(key, None)
        state[path] = items
    return state


AUDIENCES = ("agent", "tenant", "admin")


def test_credentials_open_only_their_own_audience(client, document, ops, world):
    tokens = {"agent": world["agent_a"], "tenant": world["tenant_a"], "admin": world["admin"]}
    secured = [op for op in ops if op.audience]
    assert {op.audience for op in secured} == set(AUDIENCES)
    for op in secured:
        values = dict(job_id=world["job"], name=world["name"], token_id=world["token_id"])
        for audience in AUDIENCES:
            if audience == op.audience:
                continue
            reply = call(client, document, op, tokens[audience], **values)
            assert reply.status_code == 401, (op, audience, reply.json)
            assert reply.json["detail"]["audience"] == op.audience
        for token in (None, "", "Bearer", "ragent_", "rtenant_forged", "radmin_" + "x" * 43):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            reply = client.open(op.url(**values), method=op.method, headers=headers,
                                json=call_body(document, op))
            assert reply.status_code == 401, (op, token, reply.json)
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="exploop"'


def call_body(document, op):
    if "requestBody" not in op.spec:
        return None
    return minimal(document, op.spec["requestBody"]["content"]["application/json"]["schema"])
