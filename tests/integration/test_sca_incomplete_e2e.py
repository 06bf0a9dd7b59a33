"""A repository with several ecosystems and a missing database, end to end with real
processes: the job completes with what could be checked and says what could not (job
record, exploop-admin, SARIF); a job with nothing checkable fails, naming no agent path."""
from __future__ import annotations

import pytest
import requests

from tests.support import sca_samples as fx
from tests.support.live_stack import cli
from tests.support.scanning import commit, locations, validate_sarif, write_osv_db

pytestmark = pytest.mark.e2e


def test_missing_npm_data_completes_python_and_flags_npm(stack, tmp_path):
    osv = write_osv_db(tmp_path / "agent-data" / "osv", npm=False, go=False)
    stack.start_api()
    stack.start_agent(OSV_DB_DIR=str(osv), TMPDIR=str(tmp_path))
    stack.wait_agent_online()
    tenant = stack.tenant()
    headers = {"Authorization": f"Bearer {tenant}"}
    mixed, npm_only = tmp_path / "mixed", tmp_path / "npm-only"
    commit(mixed, {"requirements.txt": "Jinja2==2.10\n", "web/package-lock.json": fx.PACKAGE_LOCK_V3})
    commit(npm_only, {"web/package-lock.json": fx.PACKAGE_LOCK_V3})

    job = stack.wait_job(tenant, stack.submit(tenant, repo_url=f"file://{mixed}", capability="sca"), timeout=90)
    assert job["status"] == "completed", job
    assert job["incomplete"] == [{"path": "web/package-lock.json", "ecosystem": "npm", "reason":
                                  "OSV database on this agent has no npm advisories (have: PyPI): run "
                                  "`exploop-agent osv-sync --ecosystem npm`"}]
    found = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}/findings", headers=headers, timeout=10).json()
    assert locations(found["items"]) == {("PYSEC-2019-217", "requirements.txt", 1),
                                         ("PYSEC-2021-66", "requirements.txt", 1)}
    shown = cli(stack, "describe", "job", job["id"])
    assert shown.exit_code == 0, shown.output
    assert "Incomplete:" in shown.output
    assert "web/package-lock.json (npm): not checked: OSV database on this agent has no npm" in shown.output
    log = requests.get(f"{stack.url}/api/v1/jobs/{job['id']}/sarif", headers=headers, timeout=10).json()
    validate_sarif(log)
    [note] = log["runs"][0]["invocations"][0]["toolExecutionNotifications"]
    assert note["level"] == "error" and "web/package-lock.json" in note["message"]["text"]

    failed = stack.wait_job(tenant, stack.submit(tenant, repo_url=f"file://{npm_only}", capability="sca"),
                            timeout=90)
    assert failed["status"] == "failed", failed
    assert failed["error"].startswith("scanner sca failed: no lockfile could be checked: web/package-lock.json: "
                                      "OSV database on "
                                      "this agent has no npm advisories")
    assert str(tmp_path) not in failed["error"] and failed["incomplete"] is None


def test_database_directory_missing_names_no_agent_path(stack, tmp_path):
    stack.start_api()
    stack.start_agent(OSV_DB_DIR=str(tmp_path / "agent-data" / "no-such-osv"), TMPDIR=str(tmp_path))
    stack.wait_agent_online()
    tenant = stack.tenant()
    repo = tmp_path / "repo"
    commit(repo, {"requirements.txt": "Jinja2==2.10\n"})
    job = stack.wait_job(tenant, stack.submit(tenant, repo_url=f"file://{repo}", capability="sca"), timeout=90)
    assert job["status"] == "failed"
    assert "OSV database directory (OSV_DB_DIR) does not exist on this agent" in job["error"]
    assert str(tmp_path) not in job["error"] and "agent-data" not in job["error"]
