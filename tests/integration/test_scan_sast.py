"""SAST scanner: bandit and the shipped semgrep rules on repositories the tests build."""
from __future__ import annotations

import json

import pytest

from tests.support import sast_samples as fx
from tests.support.scanning import commit, locations, needs_semgrep, run_scanner, semgrep_bin
from workers.scanners import sast
from workers.scanners.common import ScanError


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sast") / "repo"
    commit(path, fx.REPO, "vulnerable snippets")
    return path


@pytest.fixture(scope="module")
def bandit_only(repo):
    return sast.scan(str(repo), "none")


def test_bandit_findings_exact(bandit_only):
    assert locations(bandit_only["findings"], "bandit") == fx.BANDIT
    shell = next(f for f in bandit_only["findings"] if f["rule_id"] == "bandit.B602")
    assert (shell["severity"], shell["confidence"], shell["cwe"]) == ("high", "high", "CWE-78")
    assert shell["end_line"] == 13 and shell["message"].startswith("B602 subprocess_popen_with_shell")


def test_without_semgrep_other_languages_have_no_engine(bandit_only):
    assert [e["name"] for e in bandit_only["engines"]] == ["bandit"]
    assert bandit_only["engines"][0]["version"] == "1.9.4"
    summary = bandit_only["summary"]
    assert summary["languages"] == {"go": 1, "java": 1, "javascript": 1, "python": 2, "ruby": 1,
                                    "typescript": 1}
    assert summary["languages_without_engine"] == ["go", "java", "javascript", "ruby", "typescript"]
    assert summary["engines_unavailable"] == [{"name": "semgrep", "reason": "disabled by SEMGREP_BIN=none"}]


@needs_semgrep
def test_semgrep_rules_exact_per_language(repo):
    result = sast.scan(str(repo), semgrep_bin())
    assert locations(result["findings"], "semgrep") == fx.SEMGREP
    assert locations(result["findings"], "bandit") == fx.BANDIT
    assert {e["name"] for e in result["engines"]} == {"bandit", "semgrep"}
    assert result["summary"]["languages_without_engine"] == ["ruby"]
    by_rule = {f["rule_id"]: f for f in result["findings"]}
    assert by_rule["semgrep.js-unsafe-deserialization"]["severity"] == "critical"
    assert by_rule["semgrep.java-object-deserialization"]["cwe"] == "CWE-502"
    assert by_rule["semgrep.go-sql-string-building"]["cwe"] == "CWE-89"
    # Literal commands, parameterised queries and SHA-256 are not flagged.
    assert not any(f["path"] == "app/safe.py" for f in result["findings"] if f["engine"] == "semgrep")


def test_fingerprints_survive_rescan_and_shifted_lines(repo, tmp_path, bandit_only):
    copy = tmp_path / "copy"
    files = dict(fx.REPO)
    commit(copy, files)
    first = sast.scan(str(copy), "none")["findings"]
    files["app/vuln.py"] = '"""Module docstring."""\n# comment\n\n' + fx.PYTHON
    commit(copy, files, "shift lines")
    second = sast.scan(str(copy), "none")["findings"]
    assert {f["fingerprint"] for f in first} == {f["fingerprint"] for f in second}
    assert {f["fingerprint"] for f in first} == {f["fingerprint"] for f in bandit_only["findings"]}
    moved = {f["rule_id"]: f["start_line"] for f in second if f["path"] == "app/vuln.py"}
    assert moved["bandit.B602"] == 16  # same finding, new line
    assert len({f["fingerprint"] for f in first}) == len(first)  # the two B608s stay distinct


def test_syntax_error_is_recorded_not_fatal(tmp_path):
    path = tmp_path / "repo"
    commit(path, {"ok.py": "import pickle\npickle.loads(b'')\n", "broken.py": "def f(:\n"})
    result = sast.scan(str(path), "none")
    assert locations(result["findings"]) == {("bandit.B403", "ok.py", 1), ("bandit.B301", "ok.py", 2)}
    assert result["summary"]["coverage"][0]["errors"][0]["path"] == "broken.py"


def test_bad_semgrep_setting_fails_clearly(tmp_path):
    path = tmp_path / "repo"
    commit(path, {"a.js": "eval(x)\n"})
    with pytest.raises(ScanError, match="SEMGREP_BIN=/nonexistent/semgrep is not an executable"):
        sast.scan(str(path), "/nonexistent/semgrep")


def test_process_entry_point_prints_one_json_document(repo):
    proc = run_scanner("sast", repo, "--semgrep", "none")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert set(document) == {"engines", "findings", "summary"}
    failed = run_scanner("sast", repo, "--semgrep", "/nonexistent/semgrep")
    assert failed.returncode == 3
    assert failed.stderr.strip().splitlines()[-1] == "SEMGREP_BIN=/nonexistent/semgrep is not an executable file"
