"""SARIF details tools downstream rely on: percent-encoded relative URIs really checked by a
format checker, and an incomplete job's unchecked lockfiles as error notifications."""
from __future__ import annotations

import json

import pytest

from exploop.core.extensions import db
from exploop.core.models import Finding, Job, Tenant, utcnow
from exploop.core.sarif import artifact_uri
from tests.support.scanning import validate_sarif

UNCHECKED = [{"path": "web/package-lock.json", "ecosystem": "npm",
              "reason": "OSV database on this agent has no npm advisories (have: PyPI)"}]


def _job(app, findings, incomplete=None) -> str:
    with app.app_context():
        tenant = db.session.query(Tenant).filter_by(name="acme").one()
        job = Job(tenant_id=tenant.id, capability="sca", region="us-east-1",
                  repo_url="https://git.example.com/acme/app.git", ref="main", status="completed",
                  time_limit=600, started_at=utcnow(), finished_at=utcnow(),
                  summary_json=json.dumps({"engines": [{"name": "exploop-osv", "version": "0.1.0"}]}),
                  incomplete_json=json.dumps(incomplete) if incomplete else None)
        db.session.add(job)
        db.session.flush()
        for n, path in enumerate(findings):
            db.session.add(Finding(job_id=job.id, rule_id="PYSEC-2019-217", severity="medium", confidence="high",
                                   path=path, start_line=1, end_line=1, message="Jinja2 2.10 is affected",
                                   engine="exploop-osv", fingerprint=f"{n:032d}"))
        db.session.commit()
        return job.id


@pytest.mark.parametrize("path, uri", [
    ("requirements.txt", "requirements.txt"),
    ("deps/my requirements.txt", "deps/my%20requirements.txt"),
    ("100%/requirements.txt", "100%25/requirements.txt"),
    ("café/requirements.txt", "caf%C3%A9/requirements.txt"),
    ("a:b/requirements.txt", "a%3Ab/requirements.txt"),  # never read as a URI scheme "a:"
    ("x#y?z/requirements.txt", "x%23y%3Fz/requirements.txt"),
])
def test_artifact_uris_are_percent_encoded(app, client, tenant_key, path, uri):
    job_id = _job(app, [path])
    log = client.get(f"/api/v1/jobs/{job_id}/sarif", headers={"Authorization": f"Bearer {tenant_key}"}).get_json()
    validate_sarif(log)
    assert log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == uri
    assert artifact_uri(path) == uri


def test_the_format_checker_rejects_a_raw_path():
    """The validation really checks uri-reference: an unencoded space fails it."""
    log = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}}, "results": [
        {"message": {"text": "m"}, "locations": [{"physicalLocation": {"artifactLocation": {
            "uri": "my file.py"}}}]}]}]}
    with pytest.raises(AssertionError, match="uri-reference"):
        validate_sarif(log)


def test_incomplete_job_reports_error_notifications(app, client, tenant_key):
    job_id = _job(app, ["requirements.txt"], UNCHECKED)
    headers = {"Authorization": f"Bearer {tenant_key}"}
    job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
    assert job["incomplete"] == UNCHECKED
    log = client.get(f"/api/v1/jobs/{job_id}/sarif", headers=headers).get_json()
    validate_sarif(log)
    invocation = log["runs"][0]["invocations"][0]
    [note] = invocation["toolExecutionNotifications"]
    assert note["level"] == "error"
    assert note["message"]["text"].startswith("web/package-lock.json: not checked (npm): OSV database")
    assert note["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "web/package-lock.json"
    complete = _job(app, ["requirements.txt"])
    assert client.get(f"/api/v1/jobs/{complete}", headers=headers).get_json()["incomplete"] is None
    log = client.get(f"/api/v1/jobs/{complete}/sarif", headers=headers).get_json()
    assert "toolExecutionNotifications" not in log["runs"][0]["invocations"][0]
