"""End to end per capability with real processes: tenant REST -> Redis -> exploop-agent ->
scanner -> findings and SARIF; and bad input that fails clearly while the agent keeps working."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.support import sast_samples as fx
from tests.support import sca_samples
from tests.support.scanning import SHARED_OSV, commit, locations, needs_shared_osv, semgrep_bin, validate_sarif, write_osv_db
from tests.support.stack import Stack, auth

pytestmark = pytest.mark.e2e

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


def submit(stack: Stack, tenant: str, repo: str, capability: str, ref: str = "main") -> str:
    reply = requests.post(f"{stack.url}/api/v1/jobs", headers=auth(tenant), timeout=10,
                          json={"repo_url": repo, "ref": ref, "capability": capability, "region": "us-east-1"})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def findings_of(stack: Stack, tenant: str, job_id: str) -> list[dict]:
    reply = requests.get(f"{stack.url}/api/v1/jobs/{job_id}/findings", headers=auth(tenant),
                         params={"per_page": 500}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["items"]


def sarif_of(stack: Stack, tenant: str, job_id: str) -> dict:
    reply = requests.get(f"{stack.url}/api/v1/jobs/{job_id}/sarif", headers=auth(tenant), timeout=10)
    assert reply.status_code == 200, reply.text
    log = reply.json()
    validate_sarif(log)
    return log


@pytest.fixture
def scan_stack(tmp_path, database_url, redis_url):
    """API + one agent with an OSV database and a private TMPDIR for its workspaces."""
    stack = Stack(tmp_path, database_url, redis_url)
    stack.start_api()
    stack.agent_tmp = tmp_path / "agent-tmp"
    stack.agent_tmp.mkdir()
    env = {"TMPDIR": str(stack.agent_tmp)}
    if (SHARED_OSV / "PyPI" / "all.zip").is_file():  # without it the SCA test is skipped
        env["OSV_DB_DIR"] = str(write_osv_db(tmp_path / "osv"))
    stack.start_agent(**env)
    stack.wait_agent_online()
    yield stack
    stack.stop()


def test_sast_job_end_to_end(scan_stack, tmp_path):
    stack = scan_stack
    tenant = stack.tenant()
    repo = tmp_path / "repo"
    commit(repo, fx.REPO)
    job = stack.wait_job(tenant, submit(stack, tenant, f"file://{repo}", "sast"), timeout=90)
    assert job["status"] == "completed", job
    found = findings_of(stack, tenant, job["id"])
    assert locations(found, "bandit") == fx.BANDIT
    engines = {e["name"]: e["version"] for e in job["summary"]["engines"]}
    assert engines["bandit"] == "1.9.4"
    if semgrep_bin():
        assert locations(found, "semgrep") == fx.SEMGREP
        assert job["summary"]["languages_without_engine"] == ["ruby"]
    else:
        assert "semgrep" not in engines
        assert job["summary"]["languages_without_engine"] == ["go", "java", "javascript", "ruby", "typescript"]
    assert job["summary"]["by_severity"]["high"] == sum(f["severity"] == "high" for f in found)
    log = sarif_of(stack, tenant, job["id"])
    assert sum(len(run["results"]) for run in log["runs"]) == len(found)

    # Rescan after lines moved: the same fingerprints.
    files = dict(fx.REPO)
    files["app/vuln.py"] = "# header\n\n" + fx.PYTHON
    commit(repo, files, "shift")
    again = stack.wait_job(tenant, submit(stack, tenant, f"file://{repo}", "sast"), timeout=90)
    assert again["status"] == "completed", again
    assert {f["fingerprint"] for f in findings_of(stack, tenant, again["id"])} == {f["fingerprint"] for f in found}
    assert _workspaces(stack.agent_tmp) == []  # job directories removed


@needs_shared_osv
def test_sca_job_end_to_end(scan_stack, tmp_path):
    stack = scan_stack
    tenant = stack.tenant()
    repo = tmp_path / "repo"
    commit(repo, {"requirements.txt": "flask>=2\nJinja2==2.10\n", "web/package-lock.json": sca_samples.PACKAGE_LOCK_V3})
    job = stack.wait_job(tenant, submit(stack, tenant, f"file://{repo}", "sca"), timeout=60)
    assert job["status"] == "completed", job
    found = findings_of(stack, tenant, job["id"])
    assert locations(found) == {
        ("PYSEC-2019-217", "requirements.txt", 2), ("PYSEC-2021-66", "requirements.txt", 2),
        ("GHSA-test-lodash-0001", "web/package-lock.json", 12),
        ("GHSA-test-minimist-0002", "web/package-lock.json", 16),
        ("GHSA-test-minimist-0002", "web/package-lock.json", 19),
        ("GHSA-test-scoped-0003", "web/package-lock.json", 22)}
    summary = job["summary"]
    assert summary["osv_db"]["PyPI"]["records"] == 2661 and summary["packages_checked"] == 6
    assert summary["unpinned_count"] == 1
    assert [e["name"] for e in summary["engines"]] == ["exploop-osv"]
    log = sarif_of(stack, tenant, job["id"])
    assert {r["ruleId"] for r in log["runs"][0]["results"]} == {f["rule_id"] for f in found}


def test_secrets_job_reads_history(scan_stack, tmp_path):
    stack = scan_stack
    tenant = stack.tenant()
    repo = tmp_path / "repo"
    planted = commit(repo, {"app/settings.py": f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n'}, "oops")
    head = commit(repo, {"app/settings.py": 'AWS_ACCESS_KEY_ID = os.environ["AWS_ACCESS_KEY_ID"]\n'}, "fix")
    job = stack.wait_job(tenant, submit(stack, tenant, f"file://{repo}", "secrets"), timeout=60)
    assert job["status"] == "completed", job
    found = findings_of(stack, tenant, job["id"])
    assert [(f["rule_id"], f["path"], f["start_line"], f["commit"]) for f in found] == [
        ("secrets.aws-access-key", "app/settings.py", 1, planted)]
    assert job["summary"]["commit"] == head and job["summary"]["commits_scanned"] == 2
    log = sarif_of(stack, tenant, job["id"])
    assert log["runs"][0]["results"][0]["properties"]["commit"] == planted
    assert AWS_KEY not in str(log) and AWS_KEY not in stack.agents[0].output()


def _workspaces(tmp: Path) -> list[Path]:
    """Job checkouts in the agent's TMPDIR (each under the agent's ``exploop-work-<name>/``)."""
    return [job for root in tmp.glob("exploop-work-*") for job in root.iterdir()] + \
        [p for p in tmp.iterdir() if p.name.startswith("exploop-") and not p.name.startswith("exploop-work-")]


def _scanner_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_bad_input_fails_clearly_and_agent_keeps_working(tmp_path, database_url, redis_url):
    stack = Stack(tmp_path, database_url, redis_url,
                  extra_env={"EXPLOOP_JOB_TIME_LIMIT": "5s", "EXPLOOP_JOB_MAX_ATTEMPTS": "1"})
    try:
        stack.start_api()
        agent_tmp = tmp_path / "agent-tmp"
        agent_tmp.mkdir()
        (tmp_path / "empty-osv").mkdir()
        agent = stack.start_agent(TMPDIR=str(agent_tmp), OSV_DB_DIR=str(tmp_path / "empty-osv"),
                                  MAX_CONCURRENT_JOBS="1")
        stack.wait_agent_online()
        tenant = stack.tenant()
        good = tmp_path / "good"
        commit(good, {"requirements.txt": "Jinja2==2.10\n", "a.py": "x = 1\n"})
        slow = tmp_path / "slow"
        commit(slow, {f"pkg/m{n}.py": "".join(f'def f{i}(x):\n    return "value-{n}-{i}" + str(x)\n\n'
                                             for i in range(400)) for n in range(100)})

        def failed(repo, capability, ref="main"):
            job = stack.wait_job(tenant, submit(stack, tenant, repo, capability, ref), timeout=60)
            assert job["status"] == "failed", job
            return job["error"]

        assert failed("file:///nonexistent/repo", "secrets") == (
            "repository file:///nonexistent/repo was not found (or the credentials given cannot see it)")
        assert failed(f"file://{good}", "sast", ref="no-such-branch") == \
            f"ref 'no-such-branch' not found in file://{good}"
        assert failed(f"file://{good}", "sca") == (  # the agent's directory is not named to the tenant
            "scanner sca failed: OSV database (OSV_DB_DIR) on this agent is empty (no <Ecosystem>/all.zip"
            " or JSON records): run `exploop-agent osv-sync`")
        error = failed(f"file://{slow}", "secrets")
        assert error.startswith("job timeout during scanner secrets: time limit reached after")
        assert error.endswith("process group killed (attempt 1 of 1)")
        # The last attempt: the runbook's "failed permanently", never a false "will retry".
        assert "job failed permanently" in agent.output() and "will retry" not in agent.output()
        assert _scanner_processes("workers.scanners.secrets") == []

        # The agent is healthy and the next job runs normally.
        job = stack.wait_job(tenant, submit(stack, tenant, f"file://{good}", "secrets"), timeout=60)
        assert job["status"] == "completed", job
        assert agent.alive()
        assert stack.admin("GET", "/admin/v1/agents").json()["items"][0]["status"] == "online"
        assert _workspaces(agent_tmp) == []
    finally:
        stack.stop()


def test_agent_refuses_a_bad_scanner_setting(stack):
    stack.start_api()
    agent = stack.start_agent(SCANNER_MEMORY_LIMIT="lots")
    assert agent.wait(timeout=60) == 2
    assert "exploop-agent: SCANNER_MEMORY_LIMIT: invalid size 'lots' (use e.g. 512m, 4g)" in agent.output()
