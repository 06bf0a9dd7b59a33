"""Helpers for the scanner tests: repositories with history, OSV fixtures, SARIF checks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from workers.scanners.sast import find_semgrep

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[1] / "data"
#: The real PyPI and Go advisories (osv.dev export layout): 2,661 records of the PyPA
#: advisory database and 4,291 of the Go vulnerability database, vendored under
#: tests/data/osv (CC-BY-4.0, see its README).
SHARED_OSV = Path(os.environ.get("EXPLOOP_TEST_OSV_DIR") or DATA / "osv")

_GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, env=_GIT_ENV, check=True,
                          capture_output=True, text=True).stdout


def commit(path: Path, files: dict[str, str | None], message: str = "change") -> str:
    """Write (or, for None, delete) ``files`` in the repository at ``path`` and commit."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        git(path, "init", "-q", "-b", "main")
    for name, content in files.items():
        target = path / name
        if content is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD").strip()


def semgrep_bin() -> str | None:
    """semgrep for the tests: SEMGREP_BIN, beside this Python, or on PATH."""
    try:
        return find_semgrep(os.environ.get("SEMGREP_BIN"))
    except Exception:
        return None


needs_semgrep = pytest.mark.skipif(
    semgrep_bin() is None,
    reason="semgrep not installed (pip install -e '.[semgrep]' or set SEMGREP_BIN)")

# The real advisories are part of the repository: a missing file fails collection, never skips.
assert (SHARED_OSV / "PyPI" / "all.zip").is_file(), f"real OSV data missing at {SHARED_OSV}"
assert (SHARED_OSV / "Go" / "all.zip").is_file(), f"real Go OSV data missing at {SHARED_OSV}"
#: Marks the tests that use the real advisories (kept as a marker for readability).
needs_shared_osv = pytest.mark.osv


def run_scanner(name: str, repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a scanner the way the agent does: its own process, JSON on stdout."""
    return subprocess.run([sys.executable, "-m", f"workers.scanners.{name}", str(repo), *args],
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(env or os.environ, PYTHONPATH=str(ROOT)))


def osv_record(osv_id: str, ecosystem: str, name: str, events: list[dict], *, aliases=(),
               versions=(), severity=None, withdrawn=None, summary="test advisory",
               range_type="SEMVER", database_specific=None) -> dict:
    record = {"schema_version": "1.6.0", "id": osv_id, "modified": "2024-01-01T00:00:00Z",
              "summary": summary, "aliases": list(aliases),
              "affected": [{"package": {"ecosystem": ecosystem, "name": name},
                            "ranges": [{"type": range_type, "events": events}],
                            **({"versions": list(versions)} if versions else {})}]}
    if severity:
        record["severity"] = [{"type": "CVSS_V3", "score": severity}]
    if withdrawn:
        record["withdrawn"] = withdrawn
    if database_specific:
        record["database_specific"] = database_specific
    return record


#: Small hand-written advisories for npm and Go (the shared data is PyPI only).
NPM_RECORDS = [
    osv_record("GHSA-test-lodash-0001", "npm", "lodash", [{"introduced": "0"}, {"fixed": "4.17.21"}],
               aliases=["CVE-2021-23337"], summary="Command injection in lodash template",
               severity="CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H",
               database_specific={"cwe_ids": ["CWE-77"], "severity": "HIGH"}),
    osv_record("GHSA-test-minimist-0002", "npm", "minimist",
               [{"introduced": "0"}, {"fixed": "0.2.4"}, {"introduced": "1.0.0"}, {"fixed": "1.2.6"}],
               summary="Prototype pollution in minimist",
               severity="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"),
    osv_record("GHSA-test-scoped-0003", "npm", "@scope/widget",
               [{"introduced": "2.0.0"}, {"last_affected": "2.3.1"}], summary="Scoped package flaw"),
    osv_record("GHSA-test-withdrawn-0004", "npm", "lodash", [{"introduced": "0"}],
               withdrawn="2024-02-01T00:00:00Z", summary="withdrawn: must never match"),
]
GO_RECORDS = [
    osv_record("GO-2022-0001", "Go", "golang.org/x/text", [{"introduced": "0"}, {"fixed": "0.3.7"}],
               aliases=["CVE-2021-38561", "GHSA-ppp9-7jff-5vj2"], summary="Out-of-bounds read in x/text"),
    osv_record("GO-2023-0002", "Go", "github.com/gin-gonic/gin",
               [{"introduced": "1.0.0"}, {"fixed": "1.9.1"}], summary="gin flaw",
               severity="CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:N/I:L/A:N"),
    osv_record("GO-2023-0003", "Go", "github.com/new/fork", [{"introduced": "0"}, {"fixed": "1.5.0"}],
               summary="flaw in the replacement module"),
]


def write_osv_db(root: Path, *, pypi: bool = True, npm: bool = True, go: bool | str = True) -> Path:
    """An OSV_DB_DIR: the real PyPI export (zip) plus npm (zip) and Go (plain JSON dir of the
    small fixtures, or with ``go="real"`` the real Go export)."""
    root.mkdir(parents=True, exist_ok=True)
    if pypi:
        (root / "PyPI").mkdir(exist_ok=True)
        shutil.copy(SHARED_OSV / "PyPI" / "all.zip", root / "PyPI" / "all.zip")
    if npm:
        (root / "npm").mkdir(exist_ok=True)
        with zipfile.ZipFile(root / "npm" / "all.zip", "w") as archive:
            for record in NPM_RECORDS:
                archive.writestr(f"{record['id']}.json", json.dumps(record))
    if go == "real":
        (root / "Go").mkdir(exist_ok=True)
        shutil.copy(SHARED_OSV / "Go" / "all.zip", root / "Go" / "all.zip")
    elif go:
        (root / "Go").mkdir(exist_ok=True)
        for record in GO_RECORDS:
            (root / "Go" / f"{record['id']}.json").write_text(json.dumps(record))
    return root


def sarif_format_checker():
    """Every format the SARIF schema uses, really checked: jsonschema's draft-4 checker knows
    no ``uri-reference`` (a draft-6 name the SARIF schema uses) and checks ``uri`` only with
    an RFC 3986 library installed, so take the checker of all drafts and insist on both."""
    import jsonschema
    checker = jsonschema.FormatChecker()
    missing = {"uri", "uri-reference", "date-time"} - set(checker.checkers)
    assert not missing, f"format checks unavailable: {missing} (pip install rfc3986-validator)"
    return checker


def validate_sarif(document: dict) -> None:
    """Validate against the vendored OASIS SARIF 2.1.0 schema (raises on the first error)."""
    import jsonschema
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    validator = jsonschema.Draft4Validator(schema, format_checker=sarif_format_checker())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def locations(findings: list[dict], engine: str | None = None) -> set[tuple]:
    """(rule_id, path, start_line) of findings, optionally of one engine."""
    return {(f["rule_id"], f["path"], f["start_line"]) for f in findings
            if engine is None or f["engine"] == engine}
