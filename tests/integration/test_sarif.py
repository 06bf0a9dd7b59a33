"""``GET /api/v1/jobs/<id>/sarif``: SARIF 2.1.0 that validates, tenant isolation, states."""
from __future__ import annotations

import json

from exploop.core.extensions import db
from exploop.core.models import Finding, Job, Tenant, utcnow
from exploop.core.sarif import build_sarif
from tests.support.scanning import validate_sarif
from tests.support.stack import auth


def _job(app, tenant_name: str, status: str = "completed", **extra) -> str:
    with app.app_context():
        tenant = db.session.query(Tenant).filter_by(name=tenant_name).one()
        job = Job(tenant_id=tenant.id, capability=extra.pop("capability", "sast"), region="us-east-1",
                  repo_url=extra.pop("repo_url", "https://user:token@git.example.com/acme/app.git"),
                  ref="main", status=status, time_limit=600, started_at=utcnow(), finished_at=utcnow(),
                  summary_json=json.dumps(extra.pop("summary", {
                      "commit": "a" * 40, "languages_without_engine": ["ruby"],
                      "engines": [{"name": "bandit", "version": "1.9.4"},
                                  {"name": "semgrep", "version": "1.185.0"}]})))
        db.session.add(job)
        db.session.flush()
        for item in extra.pop("findings", []):
            db.session.add(Finding(job_id=job.id, **item))
        db.session.commit()
        return job.id


FINDINGS = [
    dict(rule_id="bandit.B602", severity="high", confidence="high", path="app/vuln.py", start_line=13,
         end_line=13, message="B602 subprocess_popen_with_shell_equals_true: subprocess call with shell=True",
         engine="bandit", cwe="CWE-78", fingerprint="f1" * 16),
    dict(rule_id="bandit.B602", severity="high", confidence="high", path="app/other.py", start_line=2,
         end_line=3, message="B602 subprocess_popen_with_shell_equals_true: again", engine="bandit",
         cwe="CWE-78", fingerprint="f2" * 16),
    dict(rule_id="semgrep.js-weak-hash", severity="medium", confidence="medium", path="web/app.js",
         start_line=11, end_line=11, message="MD5 and SHA-1 are broken for security use.", engine="semgrep",
         cwe="CWE-327", fingerprint="f3" * 16),
]


def test_sarif_validates_and_maps_findings(app, client, tenant_key):
    job_id = _job(app, "acme", findings=FINDINGS)
    reply = client.get(f"/api/v1/jobs/{job_id}/sarif", headers=auth(tenant_key))
    assert reply.status_code == 200, reply.get_data(as_text=True)
    assert reply.mimetype == "application/sarif+json"
    log = reply.get_json()
    validate_sarif(log)
    assert log["version"] == "2.1.0"
    bandit, semgrep = log["runs"]
    assert bandit["tool"]["driver"]["name"] == "bandit" and bandit["tool"]["driver"]["version"] == "1.9.4"
    assert [r["id"] for r in bandit["tool"]["driver"]["rules"]] == ["bandit.B602"]
    first = bandit["results"][0]
    assert first["ruleId"] == "bandit.B602" and first["ruleIndex"] == 0 and first["level"] == "error"
    location = first["locations"][0]["physicalLocation"]
    assert location == {"artifactLocation": {"uri": "app/vuln.py", "uriBaseId": "%SRCROOT%"},
                        "region": {"startLine": 13, "endLine": 13}}
    assert first["partialFingerprints"]["exploop/v1"]
    assert semgrep["results"][0]["level"] == "warning"
    assert semgrep["tool"]["driver"]["rules"][0]["properties"]["security-severity"] == "5.5"
    provenance = bandit["versionControlProvenance"][0]
    assert provenance == {"repositoryUri": "https://git.example.com/acme/app.git", "branch": "main",
                          "revisionId": "a" * 40}  # credentials never appear
    assert "token" not in reply.get_data(as_text=True)
    assert bandit["properties"]["languagesWithoutEngine"] == ["ruby"]


def test_engine_without_findings_is_an_empty_run(app, client, tenant_key):
    job_id = _job(app, "acme", findings=[])
    log = client.get(f"/api/v1/jobs/{job_id}/sarif", headers=auth(tenant_key)).get_json()
    validate_sarif(log)
    assert [(r["tool"]["driver"]["name"], r["results"]) for r in log["runs"]] == [("bandit", []), ("semgrep", [])]


def test_secrets_and_sca_findings_validate(app):
    secret = dict(rule_id="secrets.aws-access-key", severity="high", confidence="high", path="a.py",
                  start_line=2, end_line=2, message="AWS Access Key in git history", engine="detect-secrets",
                  cwe="CWE-798", fingerprint="s" * 32, secret_hash="0" * 64, preview="AKIA****", commit="b" * 40)
    vuln = dict(rule_id="PYSEC-2019-217", severity="medium", confidence="high", path="requirements.txt",
                start_line=None, end_line=None, message="Jinja2 2.10 is affected", engine="exploop-osv",
                fingerprint="v" * 32)
    with app.app_context():
        db.session.add(Tenant(name="other", key_hash="x" * 64))
        db.session.commit()
    job_id = _job(app, "other", repo_url="git@github.com:acme/app.git", capability="secrets",
                  summary={"engines": [{"name": "detect-secrets", "version": "1.5.0"}]},
                  findings=[secret, vuln])
    with app.app_context():
        job = db.session.get(Job, job_id)
        log = build_sarif(job, db.session.query(Finding).filter_by(job_id=job_id).all())
    validate_sarif(log)
    runs = {r["tool"]["driver"]["name"]: r for r in log["runs"]}
    assert set(runs) == {"detect-secrets", "exploop-osv"}
    result = runs["detect-secrets"]["results"][0]
    assert result["properties"]["commit"] == "b" * 40 and result["properties"]["preview"] == "AKIA****"
    assert "versionControlProvenance" not in runs["detect-secrets"]  # scp-style URL is not a URI
    osv = runs["exploop-osv"]
    assert osv["tool"]["driver"]["rules"][0]["helpUri"] == "https://osv.dev/vulnerability/PYSEC-2019-217"
    assert "region" not in osv["results"][0]["locations"][0]["physicalLocation"]


def test_other_tenant_gets_404_and_unfinished_job_409(app, client, tenant_key, make_tenant):
    job_id = _job(app, "acme", findings=FINDINGS)
    intruder = make_tenant("intruder")
    reply = client.get(f"/api/v1/jobs/{job_id}/sarif", headers=auth(intruder))
    assert reply.status_code == 404 and reply.get_json()["error"] == f"job {job_id!r} not found"
    assert client.get(f"/api/v1/jobs/{job_id}/sarif").status_code == 401
    running = _job(app, "acme", status="running")
    reply = client.get(f"/api/v1/jobs/{running}/sarif", headers=auth(tenant_key))
    assert reply.status_code == 409 and "running" in reply.get_json()["error"]
