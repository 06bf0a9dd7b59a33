"""Secrets scanner: planted keys in the working tree and in git history."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest

from tests.support.scanning import commit, git, locations, run_scanner
from workers.scanners import secrets
from workers.scanners.common import ScanError

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
STRIPE_KEY = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"
PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq98ZX\n-----END RSA PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def history_repo(tmp_path_factory):
    """c1 plants an AWS key, c2 removes it and adds a token file, c3 deletes that, c4 adds a live key."""
    path = tmp_path_factory.mktemp("secrets") / "repo"
    c1 = commit(path, {"README.md": "demo\n",
                       "app/settings.py": f'DEBUG = False\nAWS_ACCESS_KEY_ID = "{AWS_KEY}"\n'}, "c1")
    c2 = commit(path, {"app/settings.py": 'DEBUG = False\nAWS_ACCESS_KEY_ID = os.environ["AWS"]\n',
                       "deploy.py": f'x = 1\nkey = "{GITHUB_TOKEN}"\n'}, "c2")
    c3 = commit(path, {"deploy.py": None}, "c3")
    c4 = commit(path, {"pay.py": f'# billing\n\nstripe = "{STRIPE_KEY}"\n', "keys/id_rsa": PRIVATE_KEY}, "c4")
    return path, (c1, c2, c3, c4)


@pytest.fixture(scope="module")
def result(history_repo):
    return secrets.scan(str(history_repo[0]))


def test_working_tree_findings(result):
    tree = [f for f in result["findings"] if "commit" not in f]
    assert locations(tree) == {
        ("secrets.stripe-access-key", "pay.py", 3),
        ("secrets.base64-high-entropy-string", "pay.py", 3),
        ("secrets.private-key", "keys/id_rsa", 1),
    }
    key = next(f for f in tree if f["rule_id"] == "secrets.private-key")
    assert (key["severity"], key["cwe"]) == ("critical", "CWE-798")


def test_history_findings_record_the_commit(result, history_repo):
    _, (c1, c2, _, _) = history_repo
    past = {(f["rule_id"], f["path"], f["start_line"], f["commit"]) for f in result["findings"] if "commit" in f}
    assert past == {
        ("secrets.aws-access-key", "app/settings.py", 2, c1),
        ("secrets.github-token", "deploy.py", 2, c2),
        ("secrets.base64-high-entropy-string", "deploy.py", 2, c2),
    }
    aws = next(f for f in result["findings"] if f["rule_id"] == "secrets.aws-access-key")
    assert "git history" in aws["message"] and c1[:12] in aws["message"]
    assert result["summary"]["commits_scanned"] == 4 and result["summary"]["history_findings"] == 3


def test_values_never_leave_the_scanner(history_repo):
    proc = run_scanner("secrets", history_repo[0])
    assert proc.returncode == 0, proc.stderr
    for value in (AWS_KEY, GITHUB_TOKEN, STRIPE_KEY, "MIIEowIBAAKCAQEA7bq98ZX"):
        assert value not in proc.stdout and value not in proc.stderr
    document = json.loads(proc.stdout)
    aws = next(f for f in document["findings"] if f["rule_id"] == "secrets.aws-access-key")
    assert aws["preview"] == "AKIA" + "*" * 16
    assert aws["secret_hash"] == hashlib.sha256(AWS_KEY.encode()).hexdigest()


def test_secret_still_in_tree_is_reported_once(tmp_path):
    path = tmp_path / "repo"
    commit(path, {"a.py": f'k = "{AWS_KEY}"\n'}, "one")
    commit(path, {"a.py": f'# moved down\n\nk = "{AWS_KEY}"\n'}, "two")
    found = secrets.scan(str(path))["findings"]
    assert locations(found) == {("secrets.aws-access-key", "a.py", 3)}
    assert "commit" not in found[0]


def test_rescan_gives_identical_fingerprints(history_repo, result):
    again = secrets.scan(str(history_repo[0]))
    assert [f["fingerprint"] for f in again["findings"]] == [f["fingerprint"] for f in result["findings"]]


def test_shallow_checkout_is_refused(history_repo, tmp_path):
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{history_repo[0]}", str(shallow)],
                   check=True)
    with pytest.raises(ScanError, match="history scan needs a full clone"):
        secrets.scan(str(shallow))
    assert locations(secrets.scan(str(shallow), history=False)["findings"]) == {
        ("secrets.stripe-access-key", "pay.py", 3), ("secrets.base64-high-entropy-string", "pay.py", 3),
        ("secrets.private-key", "keys/id_rsa", 1)}


def test_gitleaks_reported_unavailable_without_binary(result):
    assert [e["name"] for e in result["engines"]] == ["detect-secrets"]
    assert result["summary"]["engines_unavailable"] == [
        {"name": "gitleaks", "reason": "no gitleaks binary on PATH"}]


def test_merge_commit_history(tmp_path):
    path = tmp_path / "repo"
    commit(path, {"a.txt": "base\n"}, "base")
    git(path, "checkout", "-q", "-b", "feature")
    feature = commit(path, {"feature.py": f'token = "{GITHUB_TOKEN}"\n'}, "feature")
    commit(path, {"feature.py": None}, "drop it")
    git(path, "checkout", "-q", "main")
    commit(path, {"b.txt": "main\n"}, "main work")
    git(path, "merge", "-q", "--no-ff", "-m", "merge", "feature")
    found = secrets.scan(str(path))["findings"]
    token = next(f for f in found if f["rule_id"] == "secrets.github-token")
    assert (token["path"], token["start_line"], token["commit"]) == ("feature.py", 1, feature)


FAKE_GITLEAKS = r'''#!/usr/bin/env python3
"""Stand-in for the gitleaks v8 CLI (no official binary can be installed on the test hosts):
"gitleaks version" and "gitleaks detect ... --report-path FILE" writing gitleaks' JSON report."""
import json, sys
if sys.argv[1] == "version":
    print("v8.21.2")
    sys.exit(0)
args = sys.argv[1:]
assert args[0] == "detect" and "--no-banner" in args and args[args.index("--exit-code") + 1] == "0"
report = args[args.index("--report-path") + 1]
json.dump([
    {"RuleID": "aws-access-token", "Description": "AWS", "StartLine": 2, "EndLine": 2,
     "File": "app/settings.py", "Commit": "%(c1)s", "Secret": "%(aws)s", "Match": "x"},
    {"RuleID": "generic-api-key", "Description": "Generic API Key", "StartLine": 7, "EndLine": 7,
     "File": "notes.txt", "Commit": "%(c1)s", "Secret": "only-gitleaks-sees-this-1234", "Match": "x"},
], open(report, "w"))
'''


def test_gitleaks_findings_are_merged_without_duplicates(history_repo, tmp_path, monkeypatch):
    path, (c1, *_rest) = history_repo
    binary = tmp_path / "bin" / "gitleaks"
    binary.parent.mkdir()
    binary.write_text(FAKE_GITLEAKS % {"c1": c1, "aws": AWS_KEY})
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    result = secrets.scan(str(path))
    assert {"name": "gitleaks", "version": "8.21.2"} in result["engines"]
    extra = [f for f in result["findings"] if f["engine"] == "gitleaks"]
    assert [(f["rule_id"], f["path"], f["start_line"], f["commit"]) for f in extra] == [
        ("gitleaks.generic-api-key", "notes.txt", 7, c1)]  # the AWS key was already reported
    assert extra[0]["preview"] == "only" + "*" * 24 and "engines_unavailable" not in result["summary"]
