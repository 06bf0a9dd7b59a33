"""Admin console (/ui/) through Flask's test client on a real Redis and database: sessions,
CSRF, roles, security headers, the auth-failure ban, escaping, and every page rendering.

The browser-driven scenarios (live refresh, drain with real agents, dialogs) are in
test_console_browser.py.
"""
from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from exploop.core.extensions import db
from exploop.core.models import Agent, AuditEvent, Finding, Job, JobAttempt, Tenant, utcnow
from exploop.core.security import hash_token
from tests.support.databases import add_admin_token as make_admin_token
from tests.support.databases import add_tenant as make_tenant

HOSTILE = '<script>alert("x")</script>'


def _login_csrf(client) -> str:
    page = client.get("/ui/login")
    assert page.status_code == 200
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def sign_in(client, token: str):
    return client.post("/ui/login", data={"token": token, "csrf_token": _login_csrf(client)})


def csrf_of(client, path: str = "/ui/") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


@pytest.fixture
def admin_client(app):
    client = app.test_client()
    assert sign_in(client, make_admin_token(app, "admin", "ops")).status_code == 302
    return client


@pytest.fixture
def viewer_client(app):
    client = app.test_client()
    assert sign_in(client, make_admin_token(app, "viewer", "watcher")).status_code == 302
    return client


def _agent(app, name="a1", **fields) -> None:
    with app.app_context():
        db.session.add(Agent(name=name, region="us-east-1", capabilities="sast,secrets", max_jobs=2,
                             key_hash=hash_token(f"ragent_{name}"), **fields))
        db.session.commit()


def test_pages_need_a_session_and_sign_in_sets_a_strict_httponly_cookie(app, client):
    page = client.get("/ui/agents?region=us-east-1")
    assert page.status_code == 302 and "/ui/login?next=" in page.location
    reply = sign_in(client, make_admin_token(app))
    assert reply.status_code == 302 and reply.location.endswith("/ui/")
    cookie = next(c for c in reply.headers.getlist("Set-Cookie") if c.startswith("exploop_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the HTTPS test
    assert client.get("/ui/").status_code == 200


def test_cookie_is_secure_over_https(app):
    client = app.test_client()
    page = client.get("/ui/login", base_url="https://localhost")
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    reply = client.post("/ui/login", base_url="https://localhost",
                        data={"token": make_admin_token(app), "csrf_token": form_token})
    cookie = next(c for c in reply.headers.getlist("Set-Cookie") if c.startswith("exploop_console="))
    assert "Secure" in cookie


def test_cookie_is_secure_behind_a_trusted_tls_proxy(app_config):
    from exploop.api.app import create_app, init_db
    app = create_app(dict(app_config, PROXY_COUNT=1))
    init_db(app)
    client = app.test_client()
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    page = client.get("/ui/login", headers=proxied)
    form_token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    client.set_cookie("exploop_console_login", form_token, path="/ui/login")
    reply = client.post("/ui/login", headers=proxied, data={"token": make_admin_token(app), "csrf_token": form_token})
    cookie = next(c for c in reply.headers.getlist("Set-Cookie") if c.startswith("exploop_console="))
    assert "Secure" in cookie
    app.extensions["redis"].close()


def test_security_headers_on_every_console_response(admin_client):
    for path in ("/ui/", "/ui/login", "/ui/static/console.js", "/ui/agents/rows"):
        reply = admin_client.get(path)
        csp = reply.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert reply.headers["Referrer-Policy"] == "same-origin"


def test_no_inline_script_or_external_asset_in_any_page(app, admin_client):
    _agent(app)
    for path in ("/ui/", "/ui/agents", "/ui/agents/a1", "/ui/jobs", "/ui/tokens", "/ui/tenants", "/ui/audit",
                 "/ui/login"):
        html = admin_client.get(path).text
        assert re.findall(r"<script(?![^>]*\bsrc=\"/ui/static/)", html) == [], path
        assert not re.search(r"""(src|href)="(https?:)?//""", html), path
        assert not re.search(r"<[^>]+\son\w+=", html), path
        assert "style=" not in html, path


def test_sign_out_ends_the_session_on_the_server(admin_client):
    csrf = csrf_of(admin_client)
    stolen = admin_client.get_cookie("exploop_console", path="/ui/").value
    reply = admin_client.post("/ui/logout", data={"csrf_token": csrf})
    assert reply.status_code == 302 and reply.location.endswith("/ui/login")
    # Replaying the old cookie gets nothing: the session is gone from Redis.
    admin_client.set_cookie("exploop_console", stolen, path="/ui/")
    assert admin_client.get("/ui/").status_code == 302


def test_idle_session_expires(app_config, redis_client):
    from exploop.api.app import create_app, init_db
    app = create_app(dict(app_config, CONSOLE_IDLE_TIMEOUT="1s"))
    init_db(app)
    client = app.test_client()
    sign_in(client, make_admin_token(app))
    keys = redis_client.keys("exploop:console:session:*")
    assert len(keys) == 1 and 0 < redis_client.ttl(keys[0]) <= 1
    # The id in the cookie is not what Redis stores (only its hash).
    assert client.get_cookie("exploop_console", path="/ui/").value.encode() not in keys[0]
    deadline = time.monotonic() + 10
    while redis_client.exists(keys[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/ui/").status_code == 302
    app.extensions["redis"].close()


def test_a_post_without_csrf_token_is_refused_and_audited(app, admin_client):
    _agent(app)
    reply = admin_client.post("/ui/agents/a1/drain")
    assert reply.status_code == 403 and "CSRF" in reply.text
    reply = admin_client.post("/ui/agents/a1/drain", data={"csrf_token": "forged"})
    assert reply.status_code == 403
    with app.app_context():
        assert db.session.scalar(select(Agent.desired_state).where(Agent.name == "a1")) == "active"
        events = db.session.scalars(select(AuditEvent).where(AuditEvent.action == "csrf refused")).all()
        assert [e.actor for e in events] == ["ops", "ops"]


def test_viewer_sees_no_actions_and_a_forged_post_is_refused_and_audited(app, viewer_client):
    _agent(app)
    for path in ("/ui/agents", "/ui/agents/a1", "/ui/tokens"):
        html = viewer_client.get(path).text
        assert "data-action=" not in html and 'id="create-token"' not in html, path
    csrf = csrf_of(viewer_client)
    for path in ("/ui/agents/a1/drain", "/ui/agents/a1/delete", "/ui/agents/a1/disable", "/ui/tokens"):
        reply = viewer_client.post(path, data={"csrf_token": csrf, "max_uses": "1"})
        assert reply.status_code == 403 and "needs &#39;admin&#39;" in reply.text
    with app.app_context():
        assert db.session.execute(select(Agent.desired_state, Agent.disabled).where(Agent.name == "a1")).one() \
            == ("active", False)
        denied = db.session.scalars(select(AuditEvent.target).where(AuditEvent.action == "permission denied")).all()
        assert sorted(denied) == ["POST /ui/agents/a1/delete", "POST /ui/agents/a1/disable", "POST /ui/agents/a1/drain",
                                  "POST /ui/tokens"]
    # Viewers may still sign themselves out.
    assert viewer_client.post("/ui/logout", data={"csrf_token": csrf}).status_code == 302


def test_failed_sign_ins_count_toward_the_auth_failure_ban(app_config):
    from exploop.api.app import create_app, init_db
    app = create_app(dict(app_config, AUTH_FAILURE_LIMIT=3, AUTH_FAILURE_WINDOW="60s", AUTH_BLOCK_TIME="60s"))
    init_db(app)
    client = app.test_client()
    statuses = [sign_in(client, "radmin_wrong").status_code for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    throttle = app.extensions["auth_throttle"]
    assert int(throttle.redis.get(throttle.key("admin", "127.0.0.1"))) == 5
    # The API shares the count: the next bad admin token there is refused as throttled too.
    assert client.get("/admin/v1/agents", headers={"Authorization": "Bearer radmin_bad"}).status_code == 429
    # A valid token is never refused.
    assert sign_in(client, make_admin_token(app)).status_code == 302
    app.extensions["redis"].close()


def test_revoked_token_ends_its_sessions(app, admin_client):
    from exploop.core.models import AdminToken
    with app.app_context():
        token = db.session.scalar(select(AdminToken).where(AdminToken.name == "ops"))
        token.revoked_at = utcnow()
        db.session.commit()
    assert admin_client.get("/ui/").status_code == 302


def test_hostile_values_render_as_text_and_credentials_never_appear(app, admin_client):
    make_tenant(app)
    _agent(app, host=HOSTILE, version="<b>1</b>")
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        agent = db.session.scalar(select(Agent))
        job = Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status="failed",
                  repo_url="https://deploy:s3cr3t-t0ken@git.example.com/acme/app.git", time_limit=60,
                  agent_id=agent.id, agent_name=agent.name, error=HOSTILE, finished_at=utcnow())
        db.session.add(job)
        db.session.flush()
        db.session.add(JobAttempt(job_id=job.id, attempt=1, agent_name=agent.name, ended_at=utcnow(),
                                  outcome="failed", reason=HOSTILE))
        db.session.add(Finding(job_id=job.id, rule_id="r1", severity="high", path="a.py", message=HOSTILE,
                               engine="bandit", fingerprint="f"))
        db.session.commit()
        job_id = job.id
    for path in ("/ui/jobs", f"/ui/jobs/{job_id}", "/ui/agents", "/ui/agents/a1", "/ui/agents/rows",
                 "/ui/agents/a1/live"):
        html = admin_client.get(path).text
        assert "<script>alert" not in html and "<b>1</b>" not in html, path
        assert "s3cr3t-t0ken" not in html, path
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in admin_client.get(f"/ui/jobs/{job_id}").text
    assert "https://***@git.example.com/acme/app.git" in admin_client.get(f"/ui/jobs/{job_id}").text


def test_pages_render_and_filters_use_the_admin_api_rules(app, admin_client):
    make_tenant(app)
    _agent(app, "a1")
    _agent(app, "b2")
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        for i in range(3):
            db.session.add(Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status="pending",
                               repo_url="https://git.example.com/a.git", time_limit=60,
                               created_at=utcnow() - timedelta(minutes=10 * i)))
        db.session.commit()
    fleet = admin_client.get("/ui/").text
    # sast jobs wait in us-east-1 and no agent is online there: a problem.
    assert 'class="problem" data-queue="sast.us-east-1"' in fleet
    assert "<polyline" in fleet
    agents = admin_client.get("/ui/agents?name=b&capability=sast&region=us-east-1&status=").text
    assert 'data-agent="b2"' in agents and 'data-agent="a1"' not in agents
    assert admin_client.get("/ui/agents?status=bogus").status_code == 400
    jobs = admin_client.get("/ui/jobs?status=pending&tenant=acme&capability=sast&since=15m&per_page=1")
    assert jobs.status_code == 200 and "page 1 of 2" in jobs.text and 'rel="next"' in jobs.text
    assert admin_client.get("/ui/jobs?since=soon").status_code == 400
    assert admin_client.get("/ui/jobs/nope").status_code == 404
    tenants = admin_client.get("/ui/tenants").text
    assert 'data-tenant="acme"' in tenants and "#1" in tenants
    assert admin_client.get("/ui/audit?action=console+sign+in").text.count("console sign in") >= 1


def test_token_created_in_the_page_is_shown_once_and_can_be_revoked(app, admin_client):
    csrf = csrf_of(admin_client, "/ui/tokens")
    reply = admin_client.post("/ui/tokens", data={"csrf_token": csrf, "max_uses": "1", "expires": "1h",
                                                  "region": "us-east-1", "capabilities": ["secrets"]})
    assert reply.status_code == 201
    value = re.search(r'<code id="new-token">([^<]+)</code>', reply.text).group(1)
    assert value.startswith("rboot_") or "_" in value
    listing = admin_client.get("/ui/tokens").text
    assert value not in listing and value[:12] in listing
    bad = admin_client.post("/ui/tokens", data={"csrf_token": csrf, "max_uses": "0", "expires": "soon"})
    assert bad.status_code == 400 and "max_uses" in bad.text
    token_id = re.search(r'/ui/tokens/(\d+)/revoke', listing).group(1)
    reply = admin_client.post(f"/ui/tokens/{token_id}/revoke", data={"csrf_token": csrf, "next": "/ui/tokens"})
    assert reply.status_code == 302
    assert "revoked" in admin_client.get("/ui/tokens").text


def test_bulk_queue_positions_follow_the_single_job_rule(app):
    from exploop.core import jobs as job_rules
    make_tenant(app, "acme")
    make_tenant(app, "globex")
    now = utcnow()
    with app.app_context():
        tenants = db.session.scalars(select(Tenant).order_by(Tenant.name)).all()
        for i in range(12):
            status = ("queued", "pending")[i % 2]
            queued_at = now - timedelta(seconds=100 - i) if status == "queued" else None
            db.session.add(Job(tenant_id=tenants[i % 3 % 2].id, capability=("sast", "secrets")[i % 3 % 2],
                               region="us-east-1", status=status, repo_url="https://git.example.com/a.git",
                               time_limit=60, queued_at=queued_at, admission_key=now - timedelta(seconds=(i * 7) % 11)))
        db.session.commit()
        waiting = db.session.scalars(select(Job)).all()
        assert job_rules.queue_positions(waiting) == {job.id: job_rules.queue_position(job) for job in waiting}


def test_job_page_shows_each_attempt_with_its_agent_and_reason(app, admin_client):
    from exploop.core import jobs as job_rules
    make_tenant(app)
    _agent(app, "a1")
    _agent(app, "a2")
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        job = Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status="queued",
                  repo_url="https://git.example.com/a.git", time_limit=60, queued_at=utcnow())
        db.session.add(job)
        db.session.commit()
        job_id = job.id
        first, second = (db.session.scalar(select(Agent).where(Agent.name == n)) for n in ("a1", "a2"))
        job_rules.claim(first, job_id, 1)
        job_rules.requeue(db.session.get(Job, job_id), "lease expired on agent a1")
        _, token = job_rules.claim(second, job_id, 2)
        job_rules.complete(second, job_id, 2, [], {}, token)
        assert [(a.attempt, a.agent_name, a.outcome) for a in job_rules.attempts_of(db.session.get(Job, job_id))] \
            == [(1, "a1", "requeued"), (2, "a2", "completed")]
    html = admin_client.get(f"/ui/jobs/{job_id}").text
    timeline = html[html.index('id="attempts"'):html.index("</ol>")]
    assert re.search(r"Attempt 1</strong> on\s*<a [^>]*>a1</a>.*requeued</span>: <span class=\"reason\">"
                     r"lease expired on agent a1</span>", timeline, re.S)
    assert re.search(r"Attempt 2</strong> on\s*<a [^>]*>a2</a>.*completed</span></li>", timeline, re.S)


def test_last_hour_series_count_finished_and_waiting_jobs(app):
    from exploop.api.console_fleet import hour_series
    make_tenant(app)
    now = utcnow()
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))

        def job(status, created, started=None, finished=None):
            db.session.add(Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status=status,
                               repo_url="https://git.example.com/a.git", time_limit=60, created_at=now - created,
                               started_at=now - started if started else None,
                               finished_at=now - finished if finished else None))
        minutes = lambda n: timedelta(minutes=n)  # noqa: E731
        job("completed", minutes(200), minutes(190), minutes(180))   # finished before the hour: nowhere
        job("completed", minutes(50), minutes(40), minutes(32))      # waited 50..40 min ago, finished in bucket 5
        job("failed", minutes(20), minutes(3), minutes(2))           # waited 20..3 min ago, finished in the last bucket
        job("pending", minutes(90))                                   # waiting the whole hour
        job("queued", minutes(7))                                     # waiting since 7 min ago
        db.session.commit()
        with app.test_request_context():
            series = hour_series(12)
    assert series["step_minutes"] == 5
    assert series["throughput"] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    # Sampled at the end of each 5-minute bucket: 55, 50, ..., 0 minutes ago.
    assert series["waiting"] == [1, 2, 2, 1, 1, 1, 1, 2, 2, 2, 3, 2]


def test_job_and_agent_actions_go_through_the_admin_functions_and_are_audited(app, admin_client):
    make_tenant(app)
    _agent(app, "doomed")
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        job = Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status="pending",
                  repo_url="https://git.example.com/a.git", time_limit=60)
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    csrf = csrf_of(admin_client, f"/ui/jobs/{job_id}")
    assert 'data-action="cancel"' in admin_client.get(f"/ui/jobs/{job_id}").text
    reply = admin_client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf, "next": f"/ui/jobs/{job_id}"})
    assert reply.status_code == 302 and reply.location.endswith(f"/ui/jobs/{job_id}")
    page = admin_client.get(f"/ui/jobs/{job_id}").text
    assert f"Job {job_id} cancelled." in page and 'data-action="retry"' in page
    # A refused action (cancel a cancelled job) is told on the next page, not a 500.
    admin_client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf, "next": f"/ui/jobs/{job_id}"})
    assert "only pending, queued or running jobs can be cancelled" in admin_client.get(f"/ui/jobs/{job_id}").text
    reply = admin_client.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": csrf, "next": "//evil.example/"})
    assert reply.location.endswith(f"/ui/jobs/{job_id}")  # never redirected off the console
    reply = admin_client.post("/ui/agents/doomed/delete", data={"csrf_token": csrf, "next": "/ui/agents"})
    assert reply.location.endswith("/ui/agents")
    with app.app_context():
        assert db.session.get(Job, job_id).status in ("pending", "queued")
        assert db.session.scalar(select(Agent).where(Agent.name == "doomed")) is None
        actions = db.session.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.target)
                                     .where(AuditEvent.action != "console sign in").order_by(AuditEvent.id)).all()
        assert [tuple(a) for a in actions] == [("ops", "cancel job", job_id), ("ops", "retry job", job_id),
                                               ("ops", "delete agent", "doomed")]


def test_status_filter_agrees_with_each_agents_shown_status(app, admin_client):
    _agent(app, "on")
    _agent(app, "drn", desired_state="draining")
    _agent(app, "off")
    _agent(app, "dis", disabled=True)
    _agent(app, "drn-off", desired_state="draining")
    leases = app.extensions["leases"]
    for name in ("on", "drn", "dis"):
        leases.renew(name, {"jobs_running": 0, "running_jobs": []}, 60)
    expected = {"online": {"on"}, "draining": {"drn"}, "offline": {"off", "drn-off"}, "disabled": {"dis"}}
    for status, names in expected.items():
        html = admin_client.get(f"/ui/agents?status={status}").text
        assert set(re.findall(r'data-agent="([^"]+)" data-status="' + status + '"', html)) == names, status
        assert len(re.findall(r"data-agent=", html)) == len(names), status


def test_disable_and_enable_from_the_console_requeue_and_are_audited(app, admin_client):
    make_tenant(app)
    _agent(app, "a1")
    app.extensions["leases"].renew("a1", {"jobs_running": 1, "running_jobs": []}, 60)
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        agent = db.session.scalar(select(Agent).where(Agent.name == "a1"))
        job = Job(tenant_id=tenant.id, capability="sast", region="us-east-1", status="running",
                  repo_url="https://git.example.com/a.git", time_limit=60, agent_id=agent.id, agent_name="a1",
                  started_at=utcnow())
        db.session.add(job)
        db.session.commit()
        job_id = job.id
    page = admin_client.get("/ui/agents/a1").text
    assert 'data-action="disable"' in page and 'data-action="enable"' not in page
    assert 'data-confirm="Disable a1? It is switched off at once' in page
    csrf = csrf_of(admin_client, "/ui/agents/a1")
    assert admin_client.post("/ui/agents/a1/disable").status_code == 403  # no CSRF token: refused
    reply = admin_client.post("/ui/agents/a1/disable", data={"csrf_token": csrf, "next": "/ui/agents/a1"})
    assert reply.status_code == 302 and reply.location.endswith("/ui/agents/a1")
    page = admin_client.get("/ui/agents/a1").text
    assert "Agent a1 disabled: it takes no jobs until enabled; 1 running job requeued." in page
    assert 'id="agent-status">disabled<' in page and 'id="disabled-note"' in page
    assert 'data-action="enable"' in page and 'data-action="disable"' not in page
    rows = admin_client.get("/ui/agents/rows").text
    assert 'data-agent="a1" data-status="disabled"' in rows and 'data-action="enable"' in rows
    with app.app_context():
        requeued = db.session.get(Job, job_id)
        assert requeued.status == "queued" and requeued.agent_id is None
    assert app.extensions["leases"].get("a1") is None  # its lease is dropped at once
    reply = admin_client.post("/ui/agents/a1/enable", data={"csrf_token": csrf, "next": "/ui/agents"})
    assert reply.location.endswith("/ui/agents")
    page = admin_client.get("/ui/agents").text
    assert "Agent a1 enabled" in page and 'data-agent="a1" data-status="offline"' in page
    # An unknown agent is told on the next page, not a 500.
    admin_client.post("/ui/agents/ghost/disable", data={"csrf_token": csrf, "next": "/ui/agents"})
    assert "agent &#39;ghost&#39; not found" in admin_client.get("/ui/agents").text
    with app.app_context():
        actions = db.session.execute(select(AuditEvent.actor, AuditEvent.action, AuditEvent.target).where(
            AuditEvent.target == "a1").order_by(AuditEvent.id)).all()
        assert [tuple(a) for a in actions] == [("ops", "disable agent", "a1"), ("ops", "enable agent", "a1")]


def test_fleet_page_reads_lease_presence_and_job_records_and_agrees_with_cluster_info(app, admin_client):
    make_tenant(app)
    for name in ("on", "busy", "drn", "stop", "dis", "off"):
        _agent(app, name, desired_state="draining" if name == "drn" else "active", disabled=name == "dis")
    leases = app.extensions["leases"]
    for name in ("on", "busy", "drn", "dis"):
        # The lease body's job count is stale on purpose: slots come from the job records.
        leases.renew(name, {"status": "active", "jobs_running": 2, "running_jobs": []}, 60)
    leases.renew("stop", {"status": "stopping", "jobs_running": 0, "running_jobs": []}, 60)
    with app.app_context():
        tenant = db.session.scalar(select(Tenant))
        busy = db.session.scalar(select(Agent).where(Agent.name == "busy"))
        db.session.add(Job(tenant_id=tenant.id, capability="secrets", region="us-east-1", status="running",
                           repo_url="https://git.example.com/a.git", time_limit=60, agent_id=busy.id,
                           agent_name="busy", started_at=utcnow()))
        db.session.commit()
    with app.test_request_context("/ui/"):
        from exploop.api.console_fleet import placements
        from exploop.core import fleet
        snapshot = fleet.fleet_snapshot()
        assert {kind.status: totals.agents for kind, totals in snapshot.kinds.items()} == {
            "online": 2, "draining": 1, "stopping": 1, "disabled": 1, "offline": 1}
        assert snapshot.agents == 6 and snapshot.jobs_running == {("us-east-1", "secrets"): 1}
        rows = {(r["region"], r["capability"]): r for r in placements(snapshot)}
    sast, secrets = rows[("us-east-1", "sast")], rows[("us-east-1", "secrets")]
    assert {k: sast[k] for k in ("online", "draining", "stopping", "disabled", "offline")} == {
        "online": 2, "draining": 1, "stopping": 1, "disabled": 1, "offline": 1}
    # One secrets job runs on "busy" (max 2): used 1 there; free = 2 online agents x 2 slots - 1.
    assert (sast["slots_used"], secrets["slots_used"]) == (0, 1)
    assert sast["slots_free"] == secrets["slots_free"] == 3
    info = admin_client.get("/admin/v1/cluster-info", headers={"Authorization": f"Bearer {_admin_token(app)}"}).json
    assert info["agents"]["by_status"] == {"online": 2, "draining": 1, "stopping": 1, "disabled": 1, "offline": 1}
    assert info["capacity"] == {"used": sum(r["slots_used"] for r in rows.values()), "total": 4}
    assert 'class="status status-stopping">stopping 1<' in admin_client.get("/ui/").text


def _admin_token(app) -> str:
    return make_admin_token(app, "viewer", f"reader{time.monotonic_ns()}")

