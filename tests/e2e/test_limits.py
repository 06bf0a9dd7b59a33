"""Limits: body size (413), paging, the long-poll bound, NUL characters, request line
length, and brute-force protection on every credential kind (429 + Retry-After)."""
from __future__ import annotations

import http.client
import time

import pytest
import requests

from exploop.api.app import create_app
from exploop.config import ConfigError
from exploop.core.throttle import FAILURE_PREFIX
from tests.support.databases import add_admin_token, add_tenant
from tests.support.openapi import start_stack
from tests.support.stack import auth


def limited_app(app_config, **config):
    from exploop.api.app import init_db
    app = create_app(dict(app_config, **config))
    init_db(app)
    return app


# --- body size, paging, poll timeout, NUL ----------------------------------------

def test_declared_body_over_the_limit_is_413_json_before_auth(app_config):
    client = limited_app(app_config, MAX_CONTENT_LENGTH=1024).test_client()
    big = {"repo_url": "https://x.invalid/" + "a" * 2000, "capability": "sast"}
    for method, path in (("POST", "/api/v1/jobs"), ("POST", "/platform/register"),
                         ("POST", "/admin/v1/agents/x/drain"), ("GET", "/health")):
        reply = client.open(path, method=method, json=big)
        assert reply.status_code == 413, (method, path, reply.data)
        assert reply.json == {"error": "request body over 1024 bytes", "detail": None}


def test_paging_limits(client, tenant_key):
    headers = auth(tenant_key)
    assert client.get("/api/v1/jobs?per_page=500", headers=headers).status_code == 200
    for query in ("per_page=501", "per_page=0", "page=0", "page=1000001", "per_page=x"):
        reply = client.get(f"/api/v1/jobs?{query}", headers=headers)
        assert reply.status_code == 400, query
        assert reply.json["error"].startswith("invalid request: ")


def test_unknown_query_parameters_are_400(client, tenant_key):
    reply = client.get("/api/v1/jobs?stauts=failed", headers=auth(tenant_key))
    assert reply.status_code == 400 and reply.json["detail"] == {"stauts": ["Unknown field."]}


def test_max_poll_timeout_is_served_to_agents_and_validated(app_config, admin_token):
    app = limited_app(app_config, MAX_POLL_TIMEOUT="90s")
    client = app.test_client()
    key = client.post("/admin/v1/agents", headers=auth(add_admin_token(app)), json={
        "name": "a1", "region": "us-east-1"}).json["api_key"]
    assert client.get("/platform/config", headers=auth(key)).json["max_poll_timeout"] == 90
    default = create_app(app_config).config["MAX_POLL_TIMEOUT"]
    assert default == "30s"
    with pytest.raises(ConfigError, match="EXPLOOP_MAX_POLL_TIMEOUT"):
        create_app(dict(app_config, MAX_POLL_TIMEOUT="forever"))


@pytest.mark.parametrize("name,value", [("AUTH_FAILURE_LIMIT", "0"), ("AUTH_FAILURE_LIMIT", "ten"),
                                        ("AUTH_FAILURE_WINDOW", "soon"), ("AUTH_BLOCK_TIME", "-1s"),
                                        ("PROXY_COUNT", "-1"), ("PROXY_COUNT", "two")])
def test_bad_throttle_settings_stop_the_api_naming_the_variable(app_config, name, value):
    with pytest.raises(ConfigError, match=f"EXPLOOP_{name}"):
        create_app(dict(app_config, **{name: value}))


def test_nul_characters_are_refused(client, tenant_key):
    headers = auth(tenant_key)
    assert client.get("/api/v1/jobs/abc%00def", headers=headers).status_code == 400
    assert client.get("/api/v1/jobs?status=queued%00", headers=headers).status_code == 400
    reply = client.post("/api/v1/jobs", headers=headers, data='{"repo_url": "https://a.invalid/\\u0000",'
                        ' "capability": "sast"}', content_type="application/json")
    assert reply.status_code == 400 and reply.json["detail"] == {"json": ["Invalid JSON body."]}
    # The text \u0000 (an escaped backslash) is not a NUL: it passes the check.
    reply = client.post("/api/v1/jobs", headers=headers, data='{"repo_url": "https://a.invalid/\\\\u0000",'
                        ' "capability": "sast", "region": "us-east-1"}', content_type="application/json")
    assert reply.status_code == 201, reply.json


@pytest.mark.parametrize("body", [b"[" * 100000, b'{"a":' * 5000, b'{"attempt": NaN}',
                                  b'{"attempt": ' + b"1" * 5000 + b"}", b"\xff\xfe"])
def test_hostile_json_is_400_not_500(client, admin_token, body):
    reply = client.post("/platform/register", data=body, content_type="application/json")
    assert reply.status_code == 400 and reply.json["detail"] == {"json": ["Invalid JSON body."]}


# --- brute-force protection -------------------------------------------------------

LIMIT = 3


@pytest.fixture
def strict(app_config):
    """An API that blocks after 3 failures for 120 s."""
    return limited_app(app_config, AUTH_FAILURE_LIMIT=LIMIT, AUTH_FAILURE_WINDOW="60s",
                       AUTH_BLOCK_TIME="120s")


def _attempts(strict, token_or_body, remote="10.1.1.1"):
    """A request of each credential kind, presenting ``token_or_body``."""
    client = strict.test_client()
    env = {"REMOTE_ADDR": remote}
    return {
        "agent": lambda t: client.get("/platform/config", headers=auth(t), environ_base=env),
        "lease": lambda t: client.put("/platform/lease", headers=auth(t), json={}, environ_base=env),
        "tenant": lambda t: client.get("/api/v1/jobs", headers=auth(t), environ_base=env),
        "admin": lambda t: client.get("/admin/v1/agents", headers=auth(t), environ_base=env),
        "bootstrap": lambda t: client.post("/platform/register", environ_base=env, json={
            "token": t, "region": "us-east-1", "capabilities": ["sast"]}),
    }


@pytest.mark.parametrize("kind,bad", [("agent", "ragent_wrong"), ("lease", "ragent_wrong"),
                                      ("tenant", "rtenant_wrong"), ("admin", "radmin_wrong"),
                                      ("bootstrap", "rboot_wrong")])
def test_failures_past_the_limit_are_429_with_retry_after(strict, redis_client, kind, bad):
    call = _attempts(strict, bad)[kind]
    for _ in range(LIMIT):
        assert call(bad).status_code == 401
    blocked = call(bad)
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 120
    assert blocked.json["detail"]["retry_after"] == int(blocked.headers["Retry-After"])
    assert "too many failed" in blocked.json["error"]
    audience = {"lease": "agent"}.get(kind, kind)
    assert 0 < redis_client.ttl(f"{FAILURE_PREFIX}{audience}:10.1.1.1") <= 120
    # Another address is not affected.
    assert _attempts(strict, bad, remote="10.2.2.2")[kind](bad).status_code == 401


def test_valid_credentials_are_never_throttled_nor_counted(strict, redis_client):
    admin = add_admin_token(strict)
    tenant = add_tenant(strict)
    client = strict.test_client()
    env = {"REMOTE_ADDR": "10.1.1.1"}
    key = client.post("/admin/v1/agents", headers=auth(admin), json={
        "name": "a1", "region": "us-east-1"}).json["api_key"]
    boot = client.post("/admin/v1/tokens", headers=auth(admin), json={"max_uses": 1}).json["token"]
    calls = _attempts(strict, None)
    for kind, bad in (("agent", "ragent_x"), ("tenant", "rtenant_x"), ("admin", "radmin_x"),
                      ("bootstrap", "rboot_x")):
        for _ in range(LIMIT + 2):
            calls[kind](bad)
        assert calls[kind](bad).status_code == 429
    # Every kind is blocked for this address, yet each valid credential goes through,
    # many times, and adds nothing to the count.
    counts = {k: int(v) for k, v in ((k.decode(), redis_client.get(k))
                                     for k in redis_client.scan_iter(FAILURE_PREFIX + "*"))}
    for _ in range(20):
        assert calls["lease"](key).status_code == 200
        assert calls["agent"](key).status_code == 200
        assert calls["tenant"](tenant).status_code == 200
        assert calls["admin"](admin).status_code == 200
    assert calls["bootstrap"](boot).status_code == 201
    assert {k.decode(): int(redis_client.get(k))
            for k in redis_client.scan_iter(FAILURE_PREFIX + "*")} == counts
    assert client.get("/health", environ_base=env).status_code == 200


def test_kinds_are_counted_separately(strict):
    calls = _attempts(strict, None)
    for _ in range(LIMIT + 1):
        calls["tenant"]("rtenant_x")
    assert calls["tenant"]("rtenant_x").status_code == 429
    assert calls["admin"]("radmin_x").status_code == 401
    assert calls["agent"]("ragent_x").status_code == 401


def test_block_ends_after_block_time(app_config):
    app = limited_app(app_config, AUTH_FAILURE_LIMIT=2, AUTH_FAILURE_WINDOW="60s", AUTH_BLOCK_TIME="2s")
    call = _attempts(app, None)["tenant"]
    assert [call("rtenant_x").status_code for _ in range(3)] == [401, 401, 429]
    time.sleep(2.2)
    assert call("rtenant_x").status_code == 401


def test_window_forgets_old_failures(app_config):
    app = limited_app(app_config, AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW="1s", AUTH_BLOCK_TIME="60s")
    call = _attempts(app, None)["admin"]
    assert [call("radmin_x").status_code for _ in range(2)] == [401, 401]
    time.sleep(1.2)  # the window passed: the count starts again
    assert [call("radmin_x").status_code for _ in range(3)] == [401, 401, 401]
    assert call("radmin_x").status_code == 429


def test_proxy_count_counts_the_forwarded_client(app_config):
    app = limited_app(app_config, AUTH_FAILURE_LIMIT=1, PROXY_COUNT=1)
    client = app.test_client()

    def call(client_ip):
        return client.get("/api/v1/jobs", headers=dict(auth("rtenant_x"), **{"X-Forwarded-For": client_ip}),
                          environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code
    assert [call("198.51.100.7"), call("198.51.100.7")] == [401, 429]
    assert call("203.0.113.9") == 401  # another client behind the same proxy


def test_redis_down_still_answers_401(app_config):
    app = limited_app(app_config, REDIS_URL="redis://127.0.0.1:1/0")
    reply = app.test_client().get("/api/v1/jobs", headers=auth("rtenant_x"))
    assert reply.status_code == 401


# --- live server: chunked bodies, request line, a real fleet behind one address ---

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = start_stack(tmp_path_factory.mktemp("limits"), EXPLOOP_MAX_CONTENT_LENGTH="65536")
    yield stack
    stack.stop()


def test_live_body_limit_declared_and_chunked(live):
    tenant = live.tenant("limits")
    body = b'{"repo_url": "https://x.invalid/' + b"a" * 70000 + b'", "capability": "sast"}'
    declared = requests.post(live.url + "/api/v1/jobs", data=body, timeout=10, headers=dict(
        auth(tenant), **{"Content-Type": "application/json"}))
    assert declared.status_code == 413 and declared.json()["error"] == "request body over 65536 bytes"
    chunked = requests.post(live.url + "/api/v1/jobs", data=iter([body[:40000], body[40000:]]),
                            timeout=10, headers=dict(auth(tenant), **{"Content-Type": "application/json"}))
    assert chunked.status_code == 413 and chunked.headers["Content-Type"] == "application/json"
    assert "error" in chunked.json()


def test_live_over_long_request_line_is_414_json(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    conn.request("GET", "/api/v1/jobs?status=" + "a" * 9000)
    reply = conn.getresponse()
    assert reply.status == 414 and reply.getheader("Content-Type") == "application/json"
    import json
    assert json.loads(reply.read())["error"] == "uri too long"
    # A long but valid query (the audit filters at their maximum, 4-byte characters) fits.
    query = {"actor": "\U0001F600" * 100, "action": "\U0001F600" * 64, "target": "\U0001F600" * 255}
    assert live.admin("GET", "/admin/v1/audit", params=query).status_code == 200


@pytest.mark.e2e
def test_agent_fleet_behind_one_address_is_never_throttled(tmp_path):
    """Real agents from 127.0.0.1 with the strictest limit: renewals and jobs never count.

    Then every key is revoked at once: each agent fails exactly once (its next lease
    renewal) and stops, the measurement (bench/auth_failures.py) the default limit
    is derived from. With the limit at exactly one failure per agent, all of them
    still get their 401, never a 429.
    """
    agents = 2
    stack = start_stack(tmp_path, EXPLOOP_AUTH_FAILURE_LIMIT=str(agents), EXPLOOP_AUTH_FAILURE_WINDOW="5m")
    try:
        tenant = stack.tenant("fleet")
        children = [stack.start_agent(name=f"nat-{i}", HEARTBEAT_INTERVAL="0.5s",
                                      EXPLOOP_SIMULATED_SCAN="0.2s", CAPABILITIES="secrets",
                                      MAX_CONCURRENT_JOBS="1") for i in range(agents)]
        stack.wait_agent_online(count=agents)
        job_ids = [stack.submit(tenant) for _ in range(6)]
        for job_id in job_ids:
            assert stack.wait_job(tenant, job_id)["status"] == "completed"
        time.sleep(3)  # a few more renewals from every agent
        import redis
        store = redis.Redis.from_url(stack.redis_url)
        assert list(store.scan_iter(FAILURE_PREFIX + "*")) == []
        renewals = sum(c.output().count("lease renewed successfully") for c in children)
        assert renewals >= agents * 6
        for i in range(agents):
            assert stack.admin("DELETE", f"/admin/v1/agents/nat-{i}").status_code == 204
        for child in children:
            assert child.wait(timeout=60) == 1
            assert "authentication failed" in child.output()
        assert int(store.get(f"{FAILURE_PREFIX}agent:127.0.0.1")) == agents
        store.close()
    finally:
        stack.stop()
