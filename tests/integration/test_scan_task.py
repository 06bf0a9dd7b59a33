"""The scanning part of the agent's task (``workers.tasks._scan``), run for real on local repos.

Progress reports go to an API that is not there: they are advisory and must not stop a scan.
"""
from __future__ import annotations

import time

import pytest

from exploop.client import PlatformClient
from exploop.config import ScannerSettings
from exploop.run.children import free_port
from tests.support.scanning import commit, needs_shared_osv, write_osv_db
from workers import tasks
from workers.workspace import JobError


@pytest.fixture
def client():
    return PlatformClient(f"http://127.0.0.1:{free_port()}", "ragent_x", timeout=1)


def _spec(repo, capability, ref="main"):
    return {"id": "job1", "attempt": 1, "job_token": "rjob_test", "capability": capability,
            "repo_url": f"file://{repo}", "ref": ref,
            "time_limit": 60}


@needs_shared_osv
def test_sca_findings_are_reduced_to_the_stored_shape(tmp_path, client, monkeypatch):
    repo = tmp_path / "repo"
    head = commit(repo, {"requirements.txt": "Jinja2==2.10\n"})
    settings = ScannerSettings(osv_db_dir=write_osv_db(tmp_path / "osv"))
    findings, summary, incomplete = tasks._scan(client, _spec(repo, "sca"), time.monotonic() + 60, settings)
    assert incomplete is None
    assert [f["rule_id"] for f in findings] == ["PYSEC-2019-217", "PYSEC-2021-66"]
    assert all(set(f) <= set(tasks._FINDING_FIELDS) and f["commit"] == head for f in findings)
    assert summary["commit"] == head and summary["engines"][0]["name"] == "exploop-osv"


def test_sca_without_database_fails_before_cloning(tmp_path, client, monkeypatch):
    with pytest.raises(JobError, match="OSV database not configured on this agent: set OSV_DB_DIR"):
        tasks._scan(client, _spec(tmp_path / "nowhere", "sca"), time.monotonic() + 60, ScannerSettings())


def test_too_many_findings_fail_clearly(tmp_path, client, monkeypatch):
    repo = tmp_path / "repo"
    commit(repo, {"a.py": "import pickle\npickle.loads(b'')\n"})
    monkeypatch.setattr(tasks, "MAX_FINDINGS", 1)
    with pytest.raises(JobError, match="scanner sast reported 2 findings; a job stores at most 1"):
        tasks._scan(client, _spec(repo, "sast"), time.monotonic() + 60, ScannerSettings(semgrep_bin="none"))
