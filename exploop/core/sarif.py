"""SARIF 2.1.0 logs of completed jobs: one run per engine that ran, one result per finding.

Valid against the OASIS schema (tests validate every log they fetch). Results carry
``partialFingerprints["exploop/v1"]`` (the platform's line-independent fingerprint),
so code-scanning tools follow a finding across rescans; severities map onto SARIF
levels and ``security-severity`` the way GitHub code scanning reads them.
"""
from __future__ import annotations

import re
from urllib.parse import quote, urlparse

__all__ = ["build_sarif", "artifact_uri", "SARIF_SCHEMA", "LEVELS"]

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
LEVELS = {"critical": "error", "high": "error", "medium": "warning", "low": "note", "info": "note"}
_SECURITY_SEVERITY = {"critical": "9.5", "high": "8.0", "medium": "5.5", "low": "3.0", "info": "0.0"}
_RANK = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}
_INFO_URI = {
    "bandit": "https://bandit.readthedocs.io/",
    "semgrep": "https://semgrep.dev/",
    "detect-secrets": "https://github.com/Yelp/detect-secrets",
    "gitleaks": "https://github.com/gitleaks/gitleaks",
    "exploop-osv": "https://osv.dev/",
}


def _repository_uri(url: str) -> str | None:
    """The repository URL without credentials, if it is an absolute URI at all."""
    parsed = urlparse(url)
    if not parsed.scheme or parsed.scheme not in ("https", "http", "ssh", "git", "file"):
        return None  # scp-like "git@host:path" is not a URI
    netloc = parsed.hostname or ""
    if parsed.port:
        netloc += f":{parsed.port}"
    return parsed._replace(netloc=netloc).geturl()


def _iso(value) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _rule(finding) -> dict:
    if finding.engine == "exploop-osv":
        text = f"Dependency affected by OSV advisory {finding.rule_id}"
        help_uri = f"https://osv.dev/vulnerability/{finding.rule_id}"
    else:
        text = re.split(r"(?<=[.:])\s", finding.message, maxsplit=1)[0][:300]
        help_uri = None
    tags = ["security"] + ([finding.cwe] if finding.cwe else [])
    rule = {
        "id": finding.rule_id,
        "shortDescription": {"text": text},
        "defaultConfiguration": {"level": LEVELS[finding.severity]},
        "properties": {"tags": tags, "security-severity": _SECURITY_SEVERITY[finding.severity],
                       "precision": {"high": "high", "medium": "medium", "low": "low"}.get(
                           finding.confidence or "", "medium")},
    }
    if help_uri:
        rule["helpUri"] = help_uri
    return rule


def artifact_uri(path: str) -> str:
    """A repository path as a relative URI reference: percent-encoded (spaces, ``%``,
    non-ASCII as UTF-8), ``/`` kept; ``:`` is encoded so ``a:b.py`` never reads as a scheme."""
    return quote(path, safe="/!$&'()*+,;=@-._~")


def _result(finding, rule_index: int) -> dict:
    location: dict = {"artifactLocation": {"uri": artifact_uri(finding.path), "uriBaseId": "%SRCROOT%"}}
    if finding.start_line and finding.start_line >= 1:
        region = {"startLine": finding.start_line}
        if finding.end_line and finding.end_line >= finding.start_line:
            region["endLine"] = finding.end_line
        location["region"] = region
    properties = {"severity": finding.severity}
    for key, value in (("confidence", finding.confidence), ("cwe", finding.cwe),
                       ("commit", finding.commit), ("secretHash", finding.secret_hash),
                       ("preview", finding.preview)):
        if value:
            properties[key] = value
    return {
        "ruleId": finding.rule_id,
        "ruleIndex": rule_index,
        "level": LEVELS[finding.severity],
        "message": {"text": finding.message or finding.rule_id},
        "locations": [{"physicalLocation": location}],
        "partialFingerprints": {"exploop/v1": finding.fingerprint},
        "properties": properties,
    }


def build_sarif(job, findings) -> dict:
    """The SARIF log of a completed ``job`` and its stored ``findings``."""
    summary = job.summary or {}
    engines = [e for e in summary.get("engines", []) if isinstance(e, dict) and e.get("name")]
    by_engine: dict[str, list] = {}
    for finding in findings:
        by_engine.setdefault(finding.engine, []).append(finding)
    for name in by_engine:  # findings from an engine the summary does not list
        if name not in {e["name"] for e in engines}:
            engines.append({"name": name, "version": "unknown"})
    commit = summary.get("commit")
    provenance = None
    repository = _repository_uri(job.repo_url)
    if repository:
        provenance = {"repositoryUri": repository, "branch": job.ref}
        if commit:
            provenance["revisionId"] = commit
    # What the job could not check: an error on every run, so no reader takes silence for "clean".
    notifications = [{
        "level": "error",
        "message": {"text": f"{item.get('path')}: not checked ({item.get('ecosystem') or 'unknown'}): "
                            f"{item.get('reason')}; findings of this file are missing from the report"},
        "descriptor": {"id": "exploop/unchecked-lockfile"},
        "locations": [{"physicalLocation": {"artifactLocation": {
            "uri": artifact_uri(str(item.get("path"))), "uriBaseId": "%SRCROOT%"}}}],
    } for item in (job.incomplete or [])]
    runs = []
    for engine in engines:
        rules: list[dict] = []
        index: dict[str, int] = {}
        results = []
        for finding in by_engine.get(engine["name"], []):
            if finding.rule_id not in index:
                index[finding.rule_id] = len(rules)
                rules.append(_rule(finding))
            elif _RANK[finding.severity] < _RANK.get(
                    _severity_of(rules[index[finding.rule_id]]), 4):
                rules[index[finding.rule_id]] = _rule(finding)  # the rule's worst severity
            results.append(_result(finding, index[finding.rule_id]))
        driver = {"name": engine["name"], "version": str(engine.get("version") or "unknown"),
                  "rules": rules}
        if engine["name"] in _INFO_URI:
            driver["informationUri"] = _INFO_URI[engine["name"]]
        run = {
            "tool": {"driver": driver},
            "automationDetails": {"id": f"exploop/{job.capability}/{job.id}"},
            "originalUriBaseIds": {"%SRCROOT%": {"description": {"text": "root of the scanned repository"}}},
            "invocations": [{"executionSuccessful": True,
                             **({"startTimeUtc": _iso(job.started_at)} if job.started_at else {}),
                             **({"endTimeUtc": _iso(job.finished_at)} if job.finished_at else {}),
                             **({"toolExecutionNotifications": notifications} if notifications else {})}],
            "results": results,
            "columnKind": "unicodeCodePoints",
            "properties": {"capability": job.capability, "jobId": job.id,
                           "languagesWithoutEngine": summary.get("languages_without_engine", [])},
        }
        if provenance:
            run["versionControlProvenance"] = [provenance]
        runs.append(run)
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": runs}


def _severity_of(rule: dict) -> str:
    score = rule["properties"]["security-severity"]
    return next(name for name, value in _SECURITY_SEVERITY.items() if value == score)
