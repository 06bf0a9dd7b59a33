"""What operators see is what the fleet does: running jobs from the job records, Last Seen
from the last renewal, queues nobody consumes, and answers while Redis hangs or is down.

Real API and agent processes, a real redis-server (stopped with SIGSTOP for "hangs",
killed for "down"), the admin CLI as operators run it (its default 10 s timeout).
"""
from __future__ import annotations

import re
import signal
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, select

from exploop.core.leases import AGENT_RENEWALS_KEY as LAST_RENEWAL_KEY
from exploop.core.models import Agent
from exploop.metrics import UNSERVED_SUBMITS
from tests.support.live_stack import claim_jobs, cli, heartbeat, start_live_stack, submit_job

pytestmark = pytest.mark.e2e


def row_of(table: str, first: str) -> list[str]:
    return next(re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.startswith(first + " "))


def field(page: str, label: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in page.splitlines() if line.startswith(label + ":"))


def test_running_jobs_are_the_job_records_while_they_run(stack):
    stack.start_api()
    tenant = stack.tenant()
    # A 30 s heartbeat: the lease body is a heartbeat behind for most of this test.
    agent = stack.start_agent("agent-busy", MAX_CONCURRENT_JOBS="5", HEARTBEAT_INTERVAL="30s",
                              EXPLOOP_SIMULATED_SCAN="120s")
    stack.wait_agent_online("agent-busy")
    jobs = [stack.submit(tenant) for _ in range(2)]
    stack.wait_for(lambda: all(stack.job(j)["status"] == "running" for j in jobs), 30, "two jobs running")

    described = cli(stack, "describe", "agent", "agent-busy")
    assert described.exit_code == 0, described.output
    assert [line for line in described.stdout.splitlines() if "Jobs" in line] == ["Jobs:         2/5"]
    assert set(field(described.stdout, "Running").split(",")) == set(jobs)
    listed = cli(stack, "get", "agents")
    assert row_of(listed.stdout, "agent-busy")[:4] == ["agent-busy", "online", "us-east-1", "2/5"]
    drained = cli(stack, "drain", "agent", "agent-busy")
    assert drained.stdout == "agent/agent-busy draining: takes no new jobs; 2 running jobs will finish\n"
    refused = cli(stack, "delete", "agent", "agent-busy", input="n\n")
    assert "Delete agent 'agent-busy' (draining, 2 running jobs)?" in refused.stderr
    agent.kill()  # the scans would run for two minutes


def test_last_seen_is_the_last_renewal(stack, redis_client):
    stack.start_api()
    agent = stack.start_agent("agent-seen")  # renews every second
    stack.wait_agent_online("agent-seen")
    engine = create_engine(stack.env["EXPLOOP_SQLALCHEMY_DATABASE_URI"])

    def stored_last_seen() -> datetime:
        with engine.connect() as conn:
            return conn.execute(select(Agent.last_seen).where(Agent.name == "agent-seen")).scalar_one()

    def renewed_at() -> datetime:
        value = float(redis_client.hget(LAST_RENEWAL_KEY, "agent-seen"))
        return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)

    # The database copy is written at most once a minute; wait until renewals are past it.
    stack.wait_for(lambda: (renewed_at() - stored_last_seen()).total_seconds() > 3, 30, "renewals after the copy")
    assert agent.stop() == 0
    stack.wait_for(lambda: stack.admin("GET", "/admin/v1/agents/agent-seen").json()["status"] == "offline",
                   20, "offline")
    view = stack.admin("GET", "/admin/v1/agents/agent-seen").json()
    shown = datetime.fromisoformat(view["last_seen"].removesuffix("Z"))
    assert shown == renewed_at().replace(microsecond=0)
    assert (shown - stored_last_seen()).total_seconds() > 2
    engine.dispose()


@pytest.fixture
def live(tmp_path):
    stack = start_live_stack(tmp_path)
    yield stack
    stack.redis_child.signal(signal.SIGCONT)
    stack.stop()


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_queues_nobody_consumes_are_flagged(live):
    tenant = ok(cli(live, "create", "tenant", "acme")).strip()
    key = ok(cli(live, "create", "agent", "--name=agent-secrets", "--region=us-east-1",
                 "--capabilities=secrets", "--max-jobs=3")).strip()
    heartbeat(live, key)
    claim_jobs(live, key, tenant, 1, capability="secrets")
    submit_job(live, tenant, capability="sca")  # nobody serves sca.us-east-1

    result = cli(live, "cluster-info")
    out = ok(result)
    assert row_of(out, "sca.us-east-1") == ["sca.us-east-1", "1", "0", "NO CONSUMER"]
    # Claimed over HTTP, its message still waits in the broker (no worker took it): depth 1.
    assert row_of(out, "secrets.us-east-1") == ["secrets.us-east-1", "1", "1"]
    assert "warning: queue sca.us-east-1 has jobs waiting and no online agent consumes it" in result.stderr
    assert field(out, "Capacity") == "1/3 job slots in use (33%)"


def test_cluster_info_and_get_agents_answer_while_redis_hangs_then_is_down(live):
    tenant = ok(cli(live, "create", "tenant", "acme")).strip()
    key = ok(cli(live, "create", "agent", "--name=agent-r", "--region=us-east-1", "--capabilities=secrets",
                 "--max-jobs=4")).strip()
    heartbeat(live, key)
    claim_jobs(live, key, tenant, 2)

    live.redis_child.signal(signal.SIGSTOP)  # Redis hangs: connections open, no answer
    for reason in ("TimeoutError", "ConnectionError"):
        # The CLI's default timeout (10 s) applies: a slower answer would fail these commands.
        result = cli(live, "cluster-info")
        out = ok(result)
        assert field(out, "Redis") == f"error: {reason}" and field(out, "Database") == "ok"
        assert field(out, "Agents") == "1 (1 unknown)"
        assert row_of(out, "us-east-1")[-1] == "2/0"  # running jobs from the database
        assert row_of(out, "secrets.us-east-1") == ["secrets.us-east-1", "unknown", "unknown"]
        assert f"Redis unreadable (error: {reason}): agent status, queue depths and consumers unknown" \
            in result.stderr

        result = cli(live, "get", "agents")
        assert row_of(ok(result), "agent-r")[:4] == ["agent-r", "unknown", "us-east-1", "2/4"]
        assert result.stderr == (f"warning: degraded: Redis unreadable ({reason}): status and lease TTL unknown;"
                                 " jobs, capacity and last seen from the database\n")
        described = cli(live, "describe", "agent", "agent-r")
        assert field(ok(described), "Status") == "unknown" and field(described.stdout, "Jobs") == "2/4"
        assert "warning: degraded: Redis unreadable" in described.stderr

        live.redis_child.kill()  # and now Redis is down


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_submit_to_a_queue_no_agent_serves_warns_and_counts(client, admin_token, tenant_key):
    admin, tenant = admin_token, tenant_key

    def submit(**fields):
        reply = client.post("/api/v1/jobs", headers=auth(tenant), json={
            "repo_url": "https://git.example.com/acme/app.git", "capability": "sast", **fields})
        assert reply.status_code == 201, reply.json
        return reply.json

    def counted(reason: str) -> float:
        return UNSERVED_SUBMITS.labels("sast", "us-east-1", reason)._value.get()

    before = counted("no_agent")
    # us-east-1 is a configured region, but no agent is registered there.
    assert submit(region="us-east-1")["warning"] == (
        "no registered agent serves sast.us-east-1: the job waits until an agent with capability"
        " 'sast' runs in region 'us-east-1'")
    assert counted("no_agent") == before + 1
    client.post("/admin/v1/agents", headers=auth(admin), json={
        "name": "only-secrets", "region": "us-east-1", "capabilities": ["secrets"]})
    assert "no registered agent serves sast.us-east-1" in submit(region="us-east-1")["warning"]

    key = client.post("/admin/v1/agents", headers=auth(admin), json={
        "name": "sast-east", "region": "us-east-1", "capabilities": ["sast"]}).json["api_key"]
    before = counted("no_live_agent")
    assert submit(region="us-east-1")["warning"] == (
        "no live agent consumes sast.us-east-1 now (1 registered, none online): the job waits until one is")
    assert counted("no_live_agent") == before + 1
    client.put("/platform/lease", headers=auth(key), json={})
    assert "warning" not in submit(region="us-east-1")
    assert "warning" not in submit()  # no region: it goes where a live agent is
    body = client.get("/metrics").get_data(as_text=True)
    assert 'exploop_jobs_unserved_submits_total{capability="sast",reason="no_agent",region="us-east-1"}' in body

    spec = client.get("/openapi.json").json
    created = spec["paths"]["/api/v1/jobs"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert "warning" in spec["components"]["schemas"][created["$ref"].rsplit("/", 1)[1]]["properties"]
