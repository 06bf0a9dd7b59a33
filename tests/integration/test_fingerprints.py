"""Fingerprints are unique within a job and stable across rescans, for every capability."""
from __future__ import annotations

import pytest

from tests.support import sca_samples as fx
from tests.support.scanning import commit, write_osv_db
from workers.scanners import sast, sca, secrets

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp") / "repo"
    commit(path, {
        # identical code flagged twice by one rule in one file, and in another file
        "app/run.py": "import subprocess\n\n\ndef a(cmd):\n    return subprocess.call(cmd, shell=True)\n\n\n"
                      "def b(cmd):\n    return subprocess.call(cmd, shell=True)\n",
        "app/copy.py": "import subprocess\n\n\ndef a(cmd):\n    return subprocess.call(cmd, shell=True)\n",
        # one secret value twice in one file, and once in another
        "conf/settings.py": f'PRIMARY = "{AWS_KEY}"\nBACKUP = "{AWS_KEY}"\n',
        "conf/other.py": f'KEY = "{AWS_KEY}"\n',
        # two versions of one package in one lockfile, the same pin twice in one file
        "web/package-lock.json": fx.PACKAGE_LOCK_V3, "legacy/package-lock.json": fx.PACKAGE_LOCK_V1,
        "requirements.txt": "Jinja2==2.10\nJinja2==2.10\n",
    })
    return path


@pytest.fixture(scope="module")
def osv_dir(tmp_path_factory):
    return write_osv_db(tmp_path_factory.mktemp("osv") / "db")


SCANS = {
    "sast": lambda repo, db: sast.scan(str(repo), "none"),
    "secrets": lambda repo, db: secrets.scan(str(repo), history=True),
    "sca": lambda repo, db: sca.scan(str(repo), str(db)),
}


@pytest.mark.parametrize("capability", sorted(SCANS))
def test_unique_within_a_job_and_stable_across_rescans(capability, repo, osv_dir):
    first = SCANS[capability](repo, osv_dir)["findings"]
    fingerprints = [f["fingerprint"] for f in first]
    assert len(fingerprints) >= 2
    assert len(fingerprints) == len(set(fingerprints)), capability
    again = SCANS[capability](repo, osv_dir)["findings"]
    assert [f["fingerprint"] for f in again] == fingerprints


def test_the_duplicates_are_really_there(repo, osv_dir):
    runs = {name: scan(repo, osv_dir)["findings"] for name, scan in SCANS.items()}
    shell = [f for f in runs["sast"] if f["rule_id"] == "bandit.B602" and f["path"] == "app/run.py"]
    assert len(shell) == 2
    # detect-secrets reports a value once per file (gitleaks once per occurrence: numbered)
    same_value = [f for f in runs["secrets"] if f["rule_id"] == "secrets.aws-access-key"]
    assert sorted(f["path"] for f in same_value) == ["conf/other.py", "conf/settings.py"]
    assert len({f["secret_hash"] for f in same_value}) == 1
    jinja = [f for f in runs["sca"] if f["path"] == "requirements.txt" and f["rule_id"] == "PYSEC-2019-217"]
    assert [f["start_line"] for f in jinja] == [1, 2]
