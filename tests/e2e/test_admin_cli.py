"""``exploop-admin`` end to end: every command through click's CliRunner against a real
API server process and a real Redis, in every output format.

One API process serves the whole module (``live``); each test creates the objects
it asserts on under its own names, so the tests do not depend on their order.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import requests
import yaml
from click.testing import CliRunner

from admin.cli import AGENT_STATUSES, JOB_STATUSES, main
from exploop.client import ApiClientError, PlatformClient
from exploop.run.children import free_port, script
from exploop.vocabulary import AGENT_STATUSES as FLEET_AGENT_STATUSES
from exploop.vocabulary import JOB_STATUSES as MODEL_JOB_STATUSES
from tests.support.live_stack import claim_jobs, cli, heartbeat, lines_of, start_live_stack, submit_job
from tests.support.stack import auth

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = start_live_stack(tmp_path_factory.mktemp("admin-cli"))
    yield stack
    stack.stop()


def ok(result, stderr: str | None = ""):
    """Assert success; by default nothing on stderr."""
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    if stderr is not None:
        assert result.stderr == stderr
    return result.stdout


def one_line_error(result, message: str, code: int = 1) -> None:
    """A failure is exactly one line on stderr, nothing on stdout, and a non-zero exit."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def columns(line: str) -> list[str]:
    return re.split(r" {3,}", line.strip())


def row_of(table: str, first: str) -> list[str]:
    """The columns of the one table row whose first column is ``first``."""
    rows = [columns(line) for line in table.splitlines() if columns(line)[0] == first]
    assert len(rows) == 1, (first, table)
    return rows[0]


def one_document(text: str, fmt: str):
    """Parse stdout as exactly one JSON or YAML document."""
    if fmt == "json":
        return json.loads(text)
    docs = list(yaml.safe_load_all(text))
    assert len(docs) == 1
    return docs[0]


def new_agent(live, name: str, max_jobs: int = 10, capabilities: str = "sast,sca,secrets") -> str:
    result = cli(live, "create", "agent", f"--name={name}", "--region=us-east-1",
                 f"--capabilities={capabilities}", f"--max-jobs={max_jobs}")
    out = ok(result, stderr=None)
    assert re.fullmatch(r"ragent_[\w-]{40,}\n", out), out
    return out.strip()


# --- without an API ------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["get", "--help"], ["get", "agents", "--help"],
                                  ["describe", "agent", "--help"], ["create", "token", "--help"],
                                  ["delete", "agent", "--help"], ["cluster-info", "--help"]])
def test_help_works_with_the_api_down(args):
    result = cli(f"http://127.0.0.1:{free_port()}", *args)
    assert ok(result).startswith("Usage: exploop-admin")


def test_version():
    assert ok(cli("http://127.0.0.1:1", "--version")) == "exploop-admin, version 0.1.0\n"


@pytest.mark.parametrize("args", [["get", "agents"], ["get", "jobs", "--status=failed"],
                                  ["describe", "agent", "x"], ["cluster-info"],
                                  ["create", "token", "--max-uses=1", "--expires=1h"],
                                  ["drain", "agent", "x"], ["get", "agents", "-o", "json"]])
def test_api_down_is_one_line(args):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli(url, *args, token="radmin_whatever")
    one_line_error(result, f"failed to connect to API {url}")


def test_bad_flags_are_usage_errors():
    url = "http://127.0.0.1:1"
    for args, message in ((["create", "token", "--max-uses=0"], "Invalid value for '--max-uses'"),
                          (["create", "token", "--expires=soon"], "invalid duration 'soon'"),
                          (["get", "agents", "-o", "xml"], "Invalid value for '-o'"),
                          (["get", "jobs", "--status=done"], "Invalid value for '--status'"),
                          (["create", "agent", "--name=a", "--region=r", "--capabilities=dast"],
                           "unknown capability dast"),
                          (["get", "agents", "--bogus"], "No such option '--bogus'"),
                          (["frobnicate"], "No such command 'frobnicate'")):
        result = cli(url, *args, token="radmin_x")
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stdout == ""
        assert message in result.stderr and "Usage: exploop-admin" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_token_says_where_to_get_one():
    one_line_error(cli("http://127.0.0.1:1", "get", "agents"), "no admin token")


def test_cli_status_choices_match_the_api():
    assert JOB_STATUSES == MODEL_JOB_STATUSES
    assert AGENT_STATUSES == FLEET_AGENT_STATUSES
    from exploop.api.schemas import AgentListArgs
    assert set(AGENT_STATUSES) == set(AgentListArgs._declared_fields["status"].validators[0].choices)
    assert {"online", "draining", "offline", "disabled", "unknown"} <= set(AGENT_STATUSES)


# --- bootstrap tokens -------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--max-uses=1", "--expires=1h"], ["--max-uses", "1", "--expires", "1h"]])
def test_create_token_prints_it_once_and_it_registers_one_agent(live, args):
    result = cli(live, "create", "token", *args)
    token = ok(result, stderr=None).strip()
    assert re.fullmatch(r"rboot_[\w-]{40,}", token)
    assert "shown only once" in result.stderr and result.stderr.count("\n") == 1
    assert live.register(token).status_code == 201
    second = live.register(token)
    assert second.status_code == 401
    assert second.json()["error"] == "invalid bootstrap token: used"


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_create_token_documents(live, fmt):
    result = cli(live, "create", "token", "--max-uses", "3", "--expires", "2h", "-o", fmt)
    doc = one_document(ok(result, stderr=None), fmt)
    assert doc["token"].startswith("rboot_") and doc["max_uses"] == 3 and doc["status"] == "valid"


def test_get_and_revoke_tokens(live):
    token = ok(cli(live, "create", "token", "--max-uses=2", "--expires=1h", "-o", "json"), None)
    token = json.loads(token)
    table = ok(cli(live, "get", "tokens"))
    assert columns(table.splitlines()[0]) == ["ID", "PREFIX", "STATUS", "USES", "EXPIRES", "AGE"]
    row = [columns(line) for line in table.splitlines()[1:] if columns(line)[0] == str(token["id"])][0]
    assert row[1:4] == [token["prefix"], "valid", "0/2"] and row[4] in ("in 59m", "in 1h")
    wide = ok(cli(live, "get", "tokens", "-o", "wide"))
    assert columns(wide.splitlines()[0])[-8:] == ["CREATED BY", "EXPIRES AT", "REGION", "CAPABILITIES",
                                                 "DESCRIPTION", "REVOKED AT", "REVOKED BY", "REASON"]
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "get", "tokens", "-o", fmt)), fmt)
        ours = [t for t in doc["items"] if t["id"] == token["id"]][0]
        assert "token" not in ours and ours["status"] == "valid"

    assert ok(cli(live, "revoke", "token", str(token["id"]))) == f"token/{token['id']} revoked\n"
    refused = live.register(token["token"])
    assert refused.status_code == 401 and refused.json()["error"] == "invalid bootstrap token: revoked"
    revoked = json.loads(ok(cli(live, "get", "tokens", "-o", "json")))
    assert [t["status"] for t in revoked["items"] if t["id"] == token["id"]] == ["revoked"]
    again = one_document(ok(cli(live, "revoke", "token", str(token["id"]), "-o", "yaml")), "yaml")
    assert again["status"] == "revoked"
    one_line_error(cli(live, "revoke", "token", "999999"), "token 999999 not found")


def test_expired_token_says_so(live):
    token = ok(cli(live, "create", "token", "--expires=1s"), None).strip()
    time.sleep(1.2)
    refused = live.register(token)
    assert refused.status_code == 401 and refused.json()["error"] == "invalid bootstrap token: expired"


# --- agents -----------------------------------------------------------------------------

def test_create_agent_prints_the_key_once_with_a_note(live):
    result = cli(live, "create", "agent", "--name=agent-key-test", "--region=us-east-1",
                 "--capabilities=sast,sca,secrets", "--max-jobs=5")
    key = ok(result, stderr=None).strip()
    assert key.startswith("ragent_")
    assert result.stderr.count("\n") == 1 and "save this API key" in result.stderr
    assert heartbeat(live, key)["agent"] == "agent-key-test"  # the key works
    again = cli(live, "create", "agent", "--name=agent-key-test", "--region=us-east-1")
    one_line_error(again, "agent 'agent-key-test' already exists")
    one_line_error(cli(live, "create", "agent", "--name=x", "--region=US_EAST"), "invalid request: region")
    doc = one_document(ok(cli(live, "create", "agent", "--name=agent-key-doc", "--region=us-east-1",
                              "-o", "json"), None), "json")
    assert doc["api_key"].startswith("ragent_") and doc["capabilities"] == ["sast", "sca"]
    assert doc["max_jobs"] == 5  # the server's defaults


def test_get_agents_table_is_the_runbooks(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-table"), None).strip()
    key = new_agent(live, "agent-us-east-1", max_jobs=5)
    # JOBS counts the job records; the lease body (which lags a heartbeat) and the agent's
    # own max_jobs report say otherwise here on purpose.
    claim_jobs(live, key, tenant, 3)
    heartbeat(live, key, jobs_running=0, max_jobs=10, running_jobs=[])
    new_agent(live, "agent-never-seen", max_jobs=4)

    out = ok(cli(live, "get", "agents"))
    header, *rows = out.splitlines()
    assert columns(header) == ["NAME", "STATUS", "REGION", "JOBS", "LAST SEEN"]
    assert row_of(out, "agent-us-east-1")[:4] == ["agent-us-east-1", "online", "us-east-1", "3/10"]
    assert re.fullmatch(r"\d+s", row_of(out, "agent-us-east-1")[4])
    line = [line for line in rows if line.startswith("agent-us-east-1 ")][0]
    for title, value in (("STATUS", "online"), ("REGION", "us-east-1"), ("JOBS", "3/10")):
        assert line[header.index(title):].startswith(value)  # aligned under its header
    assert row_of(out, "agent-never-seen")[1:] == ["offline", "us-east-1", "0/4", "never"]

    wide = ok(cli(live, "get", "agents", "-o", "wide"))
    assert columns(wide.splitlines()[0]) == ["NAME", "STATUS", "REGION", "JOBS", "LAST SEEN",
                                             "CAPABILITIES", "DESIRED", "LEASE TTL", "VERSION", "HOST"]
    row = row_of(wide, "agent-us-east-1")
    assert row[5:7] == ["sast,sca,secrets", "active"] and re.fullmatch(r"\d+s", row[7])
    assert row[8:] == ["0.1.0", "test-host"]
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "get", "agents", "-o", fmt)), fmt)
        ours = {a["name"]: a for a in doc["items"]}
        assert ours["agent-us-east-1"]["jobs_running"] == 3
        assert ours["agent-us-east-1"]["status"] == "online"
        assert doc["total"] == len(doc["items"])

    online = ok(cli(live, "get", "agents", "--status", "online"))
    assert lines_of(online, "agent-us-east-1") and not lines_of(online, "agent-never-seen")
    singular = ok(cli(live, "get", "agent", "--region", "us-east-1"))
    assert lines_of(singular, "agent-never-seen")


def test_empty_list_says_so_on_stderr(live):
    result = cli(live, "get", "agents", "--region", "no-such-region")
    assert ok(result, stderr="No agents found.\n") == ""
    doc = json.loads(ok(cli(live, "get", "agents", "--region", "no-such-region", "-o", "json")))
    assert doc == {"items": [], "total": 0}


def test_describe_agent(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-describe"), None).strip()
    key = new_agent(live, "agent-describe")
    running = claim_jobs(live, key, tenant, 3)
    heartbeat(live, key, jobs_running=0, max_jobs=10, running_jobs=[], nodename="agent-describe@test-host")
    out = ok(cli(live, "describe", "agent", "agent-describe"))
    assert "Jobs:         3/10\n" in out
    assert lines_of(out, "Jobs") == ["Jobs:         3/10"]  # `| grep Jobs` shows one line
    fields = dict(line.split(":", 1) for line in out.splitlines() if not line.startswith(" "))
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["Name"] == "agent-describe" and fields["Status"] == "online"
    assert fields["Desired"] == "active" and fields["Capabilities"] == "sast,sca,secrets"
    assert re.fullmatch(r"(8\d|90)s", fields["Lease TTL"])
    assert re.fullmatch(r"\S+Z \(\d+s ago\)", fields["Last Seen"])
    assert fields["Version"] == "0.1.0" and fields["Host"] == "test-host"
    assert fields["Running"] == ",".join(running) and fields["Node"] == "agent-describe@test-host"
    assert fields["History"] == ""  # the table of recent jobs follows
    assert {row.split()[0] for row in out.split("History:\n")[1].splitlines()[1:]} == set(running)
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "describe", "agent", "agent-describe", "-o", fmt)), fmt)
        assert doc["name"] == "agent-describe" and doc["lease_ttl"] > 0
        assert {j["id"] for j in doc["recent_jobs"]} == set(running)
    one_line_error(cli(live, "describe", "agent", "nope"), "agent 'nope' not found")
    one_line_error(cli(live, "describe", "agent", "../../tokens"), "not found")


def test_drain_and_uncordon(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-drain"), None).strip()
    key = new_agent(live, "agent-drain")
    claim_jobs(live, key, tenant, 2)
    heartbeat(live, key, jobs_running=0, max_jobs=10)  # a lease body a heartbeat behind
    out = ok(cli(live, "drain", "agent", "agent-drain"))
    assert out == "agent/agent-drain draining: takes no new jobs; 2 running jobs will finish\n"
    assert heartbeat(live, key, jobs_running=2)["desired_state"] == "draining"  # what the agent applies
    assert row_of(ok(cli(live, "get", "agents")), "agent-drain")[1] == "draining"
    doc = json.loads(ok(cli(live, "drain", "agent", "agent-drain", "-o", "json")))  # idempotent
    assert doc["desired_state"] == "draining" and doc["status"] == "draining"

    assert ok(cli(live, "uncordon", "agent", "agent-drain")) == "agent/agent-drain uncordoned: takes new jobs\n"
    assert heartbeat(live, key)["desired_state"] == "active"
    doc = one_document(ok(cli(live, "uncordon", "agent", "agent-drain", "-o", "yaml")), "yaml")
    assert doc["status"] == "online"
    one_line_error(cli(live, "drain", "agent", "ghost"), "agent 'ghost' not found")
    one_line_error(cli(live, "uncordon", "agent", "ghost"), "agent 'ghost' not found")


def test_delete_agent_asks_first_and_the_key_stops_at_once(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-delete"), None).strip()
    key = new_agent(live, "agent-delete")
    claim_jobs(live, key, tenant, 1)
    heartbeat(live, key, jobs_running=0)
    refused = cli(live, "delete", "agent", "agent-delete", input="n\n")
    assert refused.exit_code == 1 and refused.stdout == ""
    assert "Delete agent 'agent-delete' (online, 1 running job)?" in refused.stderr
    assert "its running jobs are requeued" in refused.stderr and "Aborted!" in refused.stderr
    assert heartbeat(live, key)["agent"] == "agent-delete"  # still there

    assert ok(cli(live, "delete", "agent", "agent-delete", input="y\n"), stderr=None) == \
        "agent/agent-delete deleted\n"
    with pytest.raises(ApiClientError) as refused_key:
        heartbeat(live, key)
    assert refused_key.value.status == 401
    one_line_error(cli(live, "describe", "agent", "agent-delete"), "agent 'agent-delete' not found")

    new_agent(live, "agent-delete-yes")
    assert ok(cli(live, "delete", "agent", "agent-delete-yes", "--yes")) == "agent/agent-delete-yes deleted\n"
    one_line_error(cli(live, "delete", "agent", "agent-delete-yes", "--yes"), "not found")
    no_input = cli(live, "delete", "agent", "agent-us-east-1-absent")
    one_line_error(no_input, "agent 'agent-us-east-1-absent' not found")


# --- tenants and jobs -------------------------------------------------------------------

def test_tenants(live):
    result = cli(live, "create", "tenant", "tenant-cli")
    key = ok(result, stderr=None).strip()
    assert key.startswith("rtenant_") and "shown only once" in result.stderr
    jobs = requests.get(f"{live.url}/api/v1/jobs", headers=auth(key), timeout=10)
    assert jobs.status_code == 200
    table = ok(cli(live, "get", "tenants"))
    assert columns(table.splitlines()[0]) == ["NAME", "ID", "PLAN", "AGE"]
    assert columns(lines_of(table, "tenant-cli")[0])[2] == "starter"
    assert columns(ok(cli(live, "get", "tenants", "-o", "wide")).splitlines()[0])[-1] == "CREATED"
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "get", "tenants", "-o", fmt)), fmt)
        assert "tenant-cli" in [t["name"] for t in doc["items"]]
    doc = json.loads(ok(cli(live, "create", "tenant", "tenant-cli-2", "-o", "json"), None))
    assert doc["api_key"].startswith("rtenant_") and doc["name"] == "tenant-cli-2"
    one_line_error(cli(live, "create", "tenant", "tenant-cli"), "tenant 'tenant-cli' already exists")
    # Plans: create on one, describe usage against its limits, move to another.
    ok(cli(live, "create", "tenant", "tenant-free", "--plan", "free"), None)
    described = ok(cli(live, "describe", "tenant", "tenant-free"))
    assert "Plan:" in described and "free" in described
    assert [line for line in described.splitlines() if line.startswith("Concurrent:")][0].split()[1] == "0/2"
    assert [line for line in described.splitlines() if line.startswith("Waiting:")][0].split()[1] == "0/10"
    assert "now on plan pro" in ok(cli(live, "update", "tenant", "tenant-free", "--plan", "pro"))
    doc = json.loads(ok(cli(live, "describe", "tenant", "tenant-free", "-o", "json")))
    assert doc["plan"] == "pro" and doc["limits"] == {"max_concurrent": 10, "max_queue": 100}
    one_line_error(cli(live, "update", "tenant", "tenant-free", "--plan", "platinum"), "unknown plan 'platinum'")
    one_line_error(cli(live, "create", "tenant", "tenant-x", "--plan", "platinum"), "unknown plan 'platinum'")


def test_jobs_describe_and_retry(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-jobs"), None).strip()
    key = new_agent(live, "agent-jobs")
    agent = PlatformClient(live.url, key)
    done, broken = submit_job(live, tenant), submit_job(live, tenant)
    token = agent.claim(done["id"], 1)["job_token"]
    agent.progress(done["id"], 1, token, 50, "scanning")
    agent.complete(done["id"], 1, token, [
        {"rule_id": "secrets.aws", "severity": "high", "path": "a.py", "message": "key", "engine": "t"},
        {"rule_id": "secrets.pw", "severity": "medium", "path": "b.py", "message": "pw", "engine": "t"},
        {"rule_id": "secrets.pw", "severity": "medium", "path": "c.py", "message": "pw", "engine": "t"}],
        {"engine": "t"})
    token = agent.claim(broken["id"], 1)["job_token"]
    agent.progress(broken["id"], 1, token, 40, "cloning")
    agent.fail(broken["id"], 1, token, "scanner crashed: out of memory\nTraceback (most recent call last)")

    table = ok(cli(live, "get", "jobs", "--tenant", "tenant-jobs"))
    assert columns(table.splitlines()[0]) == ["ID", "STATUS", "TENANT", "CAPABILITY", "REGION", "AGENT",
                                              "ATTEMPT", "AGE"]
    assert row_of(table, done["id"])[1:7] == ["completed", "tenant-jobs", "secrets",
                                                            "us-east-1", "agent-jobs", "1/3"]
    failed = ok(cli(live, "get", "jobs", "--status=failed"))
    assert lines_of(failed, broken["id"]) and not lines_of(failed, done["id"])
    wide = ok(cli(live, "get", "jobs", "--status", "failed", "-o", "wide"))
    # One line per job: the error's lines joined, long ones cut (describe shows it whole).
    assert row_of(wide, broken["id"])[-1] == "scanner crashed: out of memory Traceback (most recent cal..."
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "get", "jobs", "--tenant", "tenant-jobs", "-o", fmt)), fmt)
        assert {j["id"]: j["status"] for j in doc["items"]} == {done["id"]: "completed",
                                                                broken["id"]: "failed"}
    assert lines_of(ok(cli(live, "get", "jobs", "--agent", "agent-jobs", "--since", "1h")), done["id"])
    limited = cli(live, "get", "jobs", "--tenant", "tenant-jobs", "--limit", "1")
    assert len(ok(limited, stderr=None).splitlines()) == 2
    assert limited.stderr == "showing 1 of 2 jobs, newest first; use --limit N for more, --limit 0 for all\n"

    page = ok(cli(live, "describe", "job", done["id"]))
    fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in page.splitlines()}
    assert fields["Status"] == "completed" and fields["Attempt"] == "1/3"
    assert fields["Agent"] == "agent-jobs" and fields["Progress"] == "100% (scanning)"
    assert fields["Findings"] == "3" and fields["High"] == "1" and fields["Medium"] == "2"
    assert fields["Critical"] == "0" and fields["Error"] == "<none>"
    assert re.fullmatch(r"\d+s", fields["Ran"])
    page = ok(cli(live, "describe", "job", broken["id"]))
    assert "Error:        scanner crashed: out of memory\n              Traceback" in page
    assert "Progress:     40% (cloning)\n" in page and "Findings:     <none>\n" in page
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "describe", "job", done["id"], "-o", fmt)), fmt)
        assert doc["summary"]["by_severity"]["medium"] == 2

    agent_page = ok(cli(live, "describe", "agent", "agent-jobs"))
    history = agent_page.split("History:\n")[1]
    assert lines_of(history, done["id"]) and lines_of(history, broken["id"])

    out = ok(cli(live, "retry", "job", broken["id"]))
    assert out == f"job/{broken['id']} retried: attempt 2, now queued\n"
    page = ok(cli(live, "describe", "job", broken["id"]))
    assert "Attempt:      2/3\n" in page and "Agent:        <none> (last ran on agent-jobs)\n" in page
    one_line_error(cli(live, "retry", "job", broken["id"]),
                   "is queued; only failed or cancelled jobs can be retried")
    one_line_error(cli(live, "retry", "job", "0" * 32), f"job '{'0' * 32}' not found")
    one_line_error(cli(live, "describe", "job", "nope"), "job 'nope' not found")
    token = agent.claim(broken["id"], 2)["job_token"]
    agent.fail(broken["id"], 2, token, "again")
    doc = one_document(ok(cli(live, "retry", "job", broken["id"], "-o", "yaml")), "yaml")
    assert doc["attempt"] == 3 and doc["status"] == "queued"


def test_cluster_info(live):
    tenant = ok(cli(live, "create", "tenant", "tenant-cluster"), None).strip()
    key = new_agent(live, "agent-cluster", capabilities="sca", max_jobs=6)
    heartbeat(live, key, jobs_running=0, max_jobs=6)
    claim_jobs(live, key, tenant, 2, capability="sca")
    submit_job(live, tenant, capability="sca")
    out = ok(cli(live, "cluster-info"))
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
              for line in out.splitlines() if re.match(r"^\w[\w ()0-9]*:", line)}
    assert fields["API"] == f"ok ({live.url}, version 0.1.0)"
    assert fields["Database"] == "ok" and fields["Redis"] == "ok"
    assert re.fullmatch(r"\d+ \(.*\d+ online.*\)", fields["Agents"])
    assert re.fullmatch(r"\d+/\d+ job slots in use( \(\d+%\))?", fields["Capacity"])
    region = columns([line for line in out.splitlines() if line.startswith("us-east-1 ")][0])
    header = columns(lines_of(out, "REGION")[0])
    assert header == ["REGION", "ONLINE", "DRAINING", "STOPPING", "OFFLINE", "DISABLED", "JOBS"]
    assert region[0] == "us-east-1"
    queue = row_of(out, "sca.us-east-1")
    assert int(queue[1]) >= 1  # the job waits in its queue: no real agent consumes it
    for label in ("Pending:", "Queued:", "Running:", "Failed (24h):", "Completed (24h):"):
        assert lines_of(out, label)
    for fmt in ("json", "yaml"):
        doc = one_document(ok(cli(live, "cluster-info", "-o", fmt)), fmt)
        assert doc["redis"] == "ok" and doc["queues"]["sca.us-east-1"] >= 1
        assert doc["agents"]["by_region"]["us-east-1"]["online"] >= 1
        assert doc["capacity"]["used"] >= 2 and doc["jobs"]["queued"] >= 1


# --- credentials and audit --------------------------------------------------------------

def test_viewer_reads_but_cannot_change(live):
    result = cli(live, "create", "admin-token", "--name", "auditor", "--role", "viewer")
    viewer = ok(result, stderr=None).strip()
    assert viewer.startswith("radmin_") and "role viewer" in result.stderr
    new_agent(live, "agent-viewer")
    assert lines_of(ok(cli(live, "get", "agents", token=viewer)), "agent-viewer")
    assert ok(cli(live, "describe", "agent", "agent-viewer", token=viewer))
    assert ok(cli(live, "cluster-info", token=viewer))
    denied = "admin token 'auditor' has role 'viewer'; this action needs 'admin'"
    for args in (["drain", "agent", "agent-viewer"], ["uncordon", "agent", "agent-viewer"],
                 ["delete", "agent", "agent-viewer", "--yes"], ["create", "token"],
                 ["create", "agent", "--name=v2", "--region=us-east-1"], ["create", "tenant", "v3"],
                 ["revoke", "token", "1"], ["retry", "job", "x"],
                 ["create", "admin-token", "--name", "escalate", "--role", "admin"]):
        one_line_error(cli(live, *args, token=viewer), denied)
    reply = requests.post(f"{live.url}/admin/v1/agents/agent-viewer/drain", headers=auth(viewer), timeout=10)
    assert reply.status_code == 403 and reply.json()["error"] == denied
    assert row_of(ok(cli(live, "get", "agents")), "agent-viewer")[1] == "offline"  # not drained
    audit = json.loads(ok(cli(live, "get", "audit", "--actor", "auditor", "-o", "json")))
    assert {e["target"] for e in audit["items"] if e["action"] == "permission denied"} >= {
        "POST /admin/v1/agents/agent-viewer/drain", "DELETE /admin/v1/agents/agent-viewer"}


def test_admin_tokens_and_revocation(live):
    doc = json.loads(ok(cli(live, "create", "admin-token", "--name", "temp-admin", "--role", "admin",
                            "-o", "json"), None))
    token = doc["token"]
    assert ok(cli(live, "create", "token", token=token), None).startswith("rboot_")
    table = ok(cli(live, "get", "admin-tokens"))
    assert columns(table.splitlines()[0]) == ["ID", "NAME", "ROLE", "STATUS", "AGE"]
    assert row_of(table, str(doc["id"]))[:4] == [str(doc["id"]), "temp-admin", "admin", "active"]
    for fmt in ("json", "yaml", "wide"):
        assert "temp-admin" in ok(cli(live, "get", "admin-tokens", "-o", fmt))
    out = ok(cli(live, "revoke", "admin-token", str(doc["id"])))
    assert out == f"admin-token/{doc['id']} (temp-admin) revoked\n"
    one_line_error(cli(live, "get", "agents", token=token), "authentication failed: admin token revoked")
    one_line_error(cli(live, "get", "agents", token="radmin_" + "x" * 43), "authentication failed")
    one_line_error(cli(live, "revoke", "admin-token", "424242"), "admin token 424242 not found")


def test_audit_log_records_every_admin_action(live):
    new_agent(live, "agent-audited")
    ok(cli(live, "drain", "agent", "agent-audited"))
    ok(cli(live, "uncordon", "agent", "agent-audited"))
    ok(cli(live, "delete", "agent", "agent-audited", "--yes"))
    doc = json.loads(ok(cli(live, "get", "audit", "--target", "agent-audited", "-o", "json")))
    assert [(e["actor"], e["action"]) for e in doc["items"]] == [
        ("tests", "delete agent"), ("tests", "uncordon agent"), ("tests", "drain agent"),
        ("tests", "create agent")]
    table = ok(cli(live, "get", "audit", "--target", "agent-audited"))
    assert columns(table.splitlines()[0]) == ["TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"]
    assert columns(table.splitlines()[1])[1:4] == ["tests", "delete agent", "agent-audited"]
    drained = one_document(ok(cli(live, "get", "audit", "--action", "drain agent", "--since", "1h",
                                  "-o", "yaml")), "yaml")
    assert "agent-audited" in [e["target"] for e in drained["items"]]
    assert "ID" in ok(cli(live, "get", "audit", "-o", "wide", "--limit", "0"))
    limited = cli(live, "get", "audit", "--limit", "2")
    assert len(ok(limited, stderr=None).splitlines()) == 3 and "showing 2 of" in limited.stderr


# --- configuration ----------------------------------------------------------------------

def test_config_file_contexts(live, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({"current-context": "dead", "contexts": {
        "dead": {"api_url": dead, "token": live.admin_token},
        "live": {"api_url": live.url, "token": live.admin_token}}}))
    config.chmod(0o600)
    env = {"EXPLOOP_CONFIG": str(config)}
    def bare(*args, extra=None):
        clean = {"EXPLOOP_API_URL": None, "EXPLOOP_ADMIN_TOKEN": None, "EXPLOOP_CONTEXT": None}
        return CliRunner().invoke(main, list(args), env={**clean, **env, **(extra or {})})

    one_line_error(bare("get", "agents"), f"failed to connect to API {dead}")
    assert columns(ok(bare("--context", "live", "get", "agents")).splitlines()[0])[0] == "NAME"
    assert ok(bare("get", "agents", extra={"EXPLOOP_CONTEXT": "live"}))
    assert ok(bare("--api-url", live.url, "get", "agents"))  # the flag beats the context's URL
    one_line_error(bare("--context", "nope", "get", "agents"), "context 'nope' not found")

    config.write_text(f"[exploop]\ncurrent-context = live\n\n[context live]\napi_url = {live.url}\n"
                      f"token = {live.admin_token}\n\n[context dead]\napi_url = {dead}\n")
    assert ok(bare("get", "agents"))
    config.chmod(0o644)
    shared = bare("get", "agents")
    assert shared.exit_code == 0 and "readable by others" in shared.stderr
    config.write_text("contexts: [unclosed\n")
    one_line_error(bare("get", "agents"), "invalid YAML")
    assert bare("--help").exit_code == 0  # --help never reads the file


# --- watch (a real process: Ctrl-C is a signal) -----------------------------------------

@pytest.mark.parametrize("args, marker", [(["get", "agents"], "NAME"),
                                          (["describe", "agent", "agent-watch"], "Jobs:")])
def test_watch_renders_until_ctrl_c(live, args, marker):
    # Its own agent, whatever ran before (or did not): the test passes alone or in the module.
    if not lines_of(ok(cli(live, "get", "agents"), stderr=None), "agent-watch"):
        new_agent(live, "agent-watch")
    env = dict(os.environ, EXPLOOP_API_URL=live.url, EXPLOOP_ADMIN_TOKEN=live.admin_token,
               EXPLOOP_CONFIG=os.devnull)
    proc = subprocess.Popen([script("exploop-admin"), *args, "-w"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(seen) < 2:
            line = proc.stdout.readline()
            if line.startswith(marker):
                seen.append(time.monotonic())
        assert len(seen) == 2, proc.stderr.read() if proc.poll() is not None else "no second frame"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# --- the runbook's credential rotation, with real agent processes -------------------------

def test_rotating_agent_credentials_as_in_the_runbook(live, tmp_path):
    old = live.start_agent(name="agent-us-east-1-rot", home=tmp_path / "old")
    live.wait_agent_online("agent-us-east-1-rot")

    # 1. Create new agent record
    result = cli(live, "create", "agent", "--name=agent-us-east-1-rot-new", "--region=us-east-1")
    key = ok(result, stderr=None).strip()
    # 2. Update agent container with new key
    new = live.start_agent(home=tmp_path / "new", API_KEY=key)
    live.wait_agent_online("agent-us-east-1-rot-new")
    # 3. Drain old agent
    assert ok(cli(live, "drain", "agent", "agent-us-east-1-rot")).startswith(
        "agent/agent-us-east-1-rot draining")
    # 4. Delete old agent record (the operator answers the confirmation)
    deleted = cli(live, "delete", "agent", "agent-us-east-1-rot", input="y\n")
    assert ok(deleted, stderr=None) == "agent/agent-us-east-1-rot deleted\n"
    assert "Delete agent 'agent-us-east-1-rot'" in deleted.stderr
    assert old.wait(timeout=30) != 0  # its key stopped working: it shuts down
    assert "authentication failed" in old.output()

    table = ok(cli(live, "get", "agents"))
    assert "agent-us-east-1-rot" not in [columns(line)[0] for line in table.splitlines()]
    assert row_of(table, "agent-us-east-1-rot-new")[1] == "online"
    # The new agent reports its own MAX_CONCURRENT_JOBS (2 in these tests).
    assert "Jobs:         0/2\n" in ok(cli(live, "describe", "agent", "agent-us-east-1-rot-new"))
    assert new.alive()
    new.stop()
