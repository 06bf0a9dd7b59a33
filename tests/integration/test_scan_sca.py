"""SCA scanner: lockfiles with known-vulnerable pins against the real PyPI advisories and
small npm/Go fixtures; OSV range semantics; a missing database fails loudly."""
from __future__ import annotations

import json
import zipfile

import pytest

from tests.support import sca_samples as fx
from tests.support.scanning import commit, locations, needs_shared_osv, osv_record, run_scanner, write_osv_db
from workers.scanners import sca
from workers.scanners.common import ScanError
from workers.scanners.osv import Advisory, OsvDatabase, OsvError, is_affected

pytestmark = needs_shared_osv

EXPECTED = {
    # requirements*.txt against the real PyPI data
    ("PYSEC-2019-217", "requirements.txt", 2), ("PYSEC-2021-66", "requirements.txt", 2),
    ("PYSEC-2018-28", "requirements.txt", 3), ("PYSEC-2023-74", "requirements.txt", 3),
    ("PYSEC-2020-96", "requirements-dev.txt", 2), ("PYSEC-2021-142", "requirements-dev.txt", 2),
    ("PYSEC-2023-254", "requirements-dev.txt", 3),
    # poetry.lock: django 4.2.0 (the directory-sourced package is skipped)
    *{(i, "api/poetry.lock", 12) for i in (
        "PYSEC-2023-100", "PYSEC-2023-222", "PYSEC-2023-225", "PYSEC-2023-226", "PYSEC-2023-61",
        "PYSEC-2024-102", "PYSEC-2024-28", "PYSEC-2024-47", "PYSEC-2024-56", "PYSEC-2024-57",
        "PYSEC-2024-58", "PYSEC-2024-59", "PYSEC-2024-67", "PYSEC-2024-68", "PYSEC-2024-69",
        "PYSEC-2024-70")},
    # Pipfile.lock: pillow 8.1.0
    *{(i, "Pipfile.lock", 4) for i in (
        "PYSEC-2021-137", "PYSEC-2021-138", "PYSEC-2021-139", "PYSEC-2021-317", "PYSEC-2021-331",
        "PYSEC-2021-35", "PYSEC-2021-36", "PYSEC-2021-37", "PYSEC-2021-38", "PYSEC-2021-39",
        "PYSEC-2021-40", "PYSEC-2021-41", "PYSEC-2021-42", "PYSEC-2021-92", "PYSEC-2021-93",
        "PYSEC-2021-94", "PYSEC-2022-10", "PYSEC-2022-168", "PYSEC-2022-42979", "PYSEC-2022-8",
        "PYSEC-2022-9", "PYSEC-2023-175", "PYSEC-2023-227")},
    # package-lock.json v3 and v1 (nested, aliased), npm fixtures
    ("GHSA-test-lodash-0001", "web/package-lock.json", 12),
    ("GHSA-test-minimist-0002", "web/package-lock.json", 16),
    ("GHSA-test-minimist-0002", "web/package-lock.json", 19),
    ("GHSA-test-scoped-0003", "web/package-lock.json", 22),
    ("GHSA-test-minimist-0002", "legacy/package-lock.json", 15),
    ("GHSA-test-minimist-0002", "legacy/package-lock.json", 20),
    ("GHSA-test-lodash-0001", "legacy/package-lock.json", 23),
    # go.mod, Go fixtures (a replaced module is checked as its replacement)
    ("GO-2023-0002", "svc/go.mod", 6), ("GO-2022-0001", "svc/go.mod", 7),
    ("GO-2023-0003", "svc/go.mod", 8),
}


@pytest.fixture(scope="module")
def osv_dir(tmp_path_factory):
    return write_osv_db(tmp_path_factory.mktemp("osv") / "db")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sca") / "repo"
    commit(path, {"requirements.txt": fx.REQUIREMENTS, "requirements-dev.txt": fx.REQUIREMENTS_DEV,
                  "api/poetry.lock": fx.POETRY_LOCK, "Pipfile.lock": fx.PIPFILE_LOCK,
                  "web/package-lock.json": fx.PACKAGE_LOCK_V3, "legacy/package-lock.json": fx.PACKAGE_LOCK_V1,
                  "svc/go.mod": fx.GO_MOD, "web/node_modules/x/package-lock.json": "{}"})
    return path


@pytest.fixture(scope="module")
def result(repo, osv_dir):
    return sca.scan(str(repo), str(osv_dir))


def test_every_lockfile_kind_exact_findings(result):
    assert locations(result["findings"]) == EXPECTED
    assert len(result["findings"]) == len(EXPECTED)


def test_summary_says_what_was_checked(result):
    summary = result["summary"]
    assert summary["osv_db"]["PyPI"]["records"] == 2661
    assert summary["osv_db"]["npm"]["records"] == 4 and summary["osv_db"]["Go"]["records"] == 3
    assert {(f["path"], f["ecosystem"], f["packages"]) for f in summary["lockfiles"]} == {
        ("Pipfile.lock", "PyPI", 2), ("api/poetry.lock", "PyPI", 2), ("requirements.txt", "PyPI", 3),
        ("requirements-dev.txt", "PyPI", 3), ("web/package-lock.json", "npm", 5),
        ("legacy/package-lock.json", "npm", 5), ("svc/go.mod", "Go", 6)}  # + stdlib, toolchain
    assert summary["packages_checked"] == 26
    assert summary["unpinned"] == [{"path": "requirements.txt", "line": 5, "requirement": "flask>=1.0",
                                    "reason": "no exact == pin"}]


def test_finding_details_aliases_fix_and_severity(result):
    by_key = {(f["rule_id"], f["path"], f["start_line"]): f for f in result["findings"]}
    jinja = by_key[("PYSEC-2019-217", "requirements.txt", 2)]
    assert jinja["aliases"] == ["CVE-2019-10906", "GHSA-462w-v97r-4m45"]
    assert jinja["fixed"] == ["2.10.1"] and jinja["confidence"] == "high"
    assert "Jinja2 2.10 (PyPI) is affected by PYSEC-2019-217" in jinja["message"]
    assert "CVE-2019-10906" in jinja["message"] and "Fixed in: 2.10.1." in jinja["message"]
    assert jinja["severity"] == "medium" and "no severity score" in jinja["message"]
    crypto = by_key[("PYSEC-2023-254", "requirements-dev.txt", 3)]
    assert crypto["severity"] == "high" and "CVSS_V3 7.5" in crypto["message"]  # real CVSS vector
    lodash = by_key[("GHSA-test-lodash-0001", "web/package-lock.json", 12)]
    assert (lodash["severity"], lodash["cwe"], lodash["package"]["version"]) == ("high", "CWE-77", "4.17.20")
    assert by_key[("GHSA-test-minimist-0002", "web/package-lock.json", 16)]["severity"] == "critical"
    aliased = by_key[("GHSA-test-lodash-0001", "legacy/package-lock.json", 23)]
    assert aliased["package"] == {"ecosystem": "npm", "name": "lodash", "version": "4.17.4"}
    assert not any("withdrawn" in f["rule_id"] for f in result["findings"])


def test_rescan_and_version_bump_keep_fingerprints(repo, osv_dir, result, tmp_path):
    again = sca.scan(str(repo), str(osv_dir))
    assert [f["fingerprint"] for f in again["findings"]] == [f["fingerprint"] for f in result["findings"]]
    bumped = tmp_path / "bumped"
    commit(bumped, {"requirements.txt": "# moved\n\nJinja2==2.10\n"})
    first = {f["rule_id"]: f["fingerprint"] for f in sca.scan(str(bumped), str(osv_dir))["findings"]}
    commit(bumped, {"requirements.txt": "# moved again\n\n\n\nJinja2==2.10.0\n"})
    second = sca.scan(str(bumped), str(osv_dir))["findings"]
    assert {f["rule_id"]: f["fingerprint"] for f in second} == first
    assert {f["start_line"] for f in second} == {5}


def test_patched_pins_have_no_findings(tmp_path, osv_dir):
    path = tmp_path / "repo"
    commit(path, {"requirements.txt": "Jinja2==3.1.4\nrequests==2.32.3\nDjango==5.1.2\n"})
    result = sca.scan(str(path), str(osv_dir))
    assert result["findings"] == [] and result["summary"]["packages_checked"] == 3


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: None, "OSV database not configured: set OSV_DB_DIR"),
    (lambda tmp: tmp / "missing", "does not exist on this agent: run `exploop-agent osv-sync`"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is empty"),
    (lambda tmp: write_osv_db(tmp / "npm-only", pypi=False, go=False), "has no PyPI advisories"),
])
def test_missing_or_empty_database_fails(tmp_path, setup, message):
    path = tmp_path / "repo"
    commit(path, {"requirements.txt": "Jinja2==2.10\n"})
    with pytest.raises(ScanError, match=message):
        sca.scan(str(path), setup(tmp_path))


def test_empty_archive_and_corrupt_archive_fail(tmp_path):
    path = tmp_path / "repo"
    commit(path, {"requirements.txt": "Jinja2==2.10\n"})
    (tmp_path / "db" / "PyPI").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "db" / "PyPI" / "all.zip", "w"):
        pass
    with pytest.raises(ScanError, match="is empty"):
        sca.scan(str(path), str(tmp_path / "db"))
    (tmp_path / "db" / "PyPI" / "all.zip").write_bytes(b"PK\x03\x04 not really a zip" * 4)
    with pytest.raises(ScanError, match="is corrupt"):
        sca.scan(str(path), str(tmp_path / "db"))


def test_no_lockfile_says_nothing_was_checked(tmp_path, osv_dir):
    path = tmp_path / "repo"
    commit(path, {"README.md": "no deps\n"})
    result = sca.scan(str(path), str(osv_dir))
    assert result["findings"] == [] and result["summary"]["packages_checked"] == 0
    assert "no package was checked" in result["summary"]["note"]


def test_broken_lockfile_fails_the_scan(tmp_path, osv_dir):
    path = tmp_path / "repo"
    commit(path, {"package-lock.json": '{"lockfileVersion": 3, "packages": {'})
    proc = run_scanner("sca", path, "--osv-db", str(osv_dir))
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith("no lockfile could be checked: package-lock.json: invalid JSON")


# --- OSV evaluation ----------------------------------------------------------

def _affected(ecosystem, events, versions=(), range_type="ECOSYSTEM"):
    return {"package": {"ecosystem": ecosystem, "name": "p"}, "versions": list(versions),
            "ranges": [{"type": range_type, "events": events}]}


@pytest.mark.parametrize("version, expected", [
    ("0.9", False), ("1.0", True), ("1.4.9", True), ("1.5", False), ("1.9", False),
    ("2.0", True), ("2.2.0", True), ("2.3", False), ("3.0rc1", False),
])
def test_introduced_fixed_pairs_pypi(version, expected):
    entry = _affected("PyPI", [{"introduced": "1.0"}, {"fixed": "1.5"}, {"introduced": "2.0"}, {"fixed": "2.3"}])
    assert is_affected("PyPI", version, entry) is expected


@pytest.mark.parametrize("version, expected", [
    ("1.2.3", True), ("1.2.4", False), ("1.2.3-beta.1", True), ("0.0.1", True),
])
def test_last_affected_semver(version, expected):
    entry = _affected("npm", [{"introduced": "0"}, {"last_affected": "1.2.3"}], range_type="SEMVER")
    assert is_affected("npm", version, entry) is expected


def test_limit_and_versions_list_and_go_prefix():
    limited = _affected("npm", [{"introduced": "1.0.0"}, {"limit": "2.0.0"}], range_type="SEMVER")
    assert is_affected("npm", "1.5.0", limited) and not is_affected("npm", "2.1.0", limited)
    listed = _affected("PyPI", [], versions=["0.5", "0.6"])
    assert is_affected("PyPI", "0.6", listed) and is_affected("PyPI", "0.6.0", listed)
    assert not is_affected("PyPI", "0.7", listed)
    go = _affected("Go", [{"introduced": "0"}, {"fixed": "0.3.7"}], range_type="SEMVER")
    assert is_affected("Go", "v0.3.6", go) and not is_affected("Go", "v0.3.7", go)
    assert is_affected("Go", "v0.0.0-20210101000000-abcdef123456", go)  # pseudo-version
    git_only = _affected("PyPI", [{"introduced": "0"}, {"fixed": "abc123"}], range_type="GIT")
    assert not is_affected("PyPI", "1.0", git_only)


def test_withdrawn_records_are_ignored(tmp_path):
    db = tmp_path / "db" / "npm"
    db.mkdir(parents=True)
    for record in (osv_record("GHSA-a", "npm", "left-pad", [{"introduced": "0"}]),
                   osv_record("GHSA-b", "npm", "left-pad", [{"introduced": "0"}], withdrawn="2024-01-01T00:00:00Z")):
        (db / f"{record['id']}.json").write_text(json.dumps(record))
    index = OsvDatabase(tmp_path / "db").load("npm", {"left-pad"})
    assert [a.id for a in index["left-pad"]] == ["GHSA-a"]


def test_aliased_records_become_one_finding():
    pysec = Advisory.from_record(osv_record("PYSEC-1", "PyPI", "p", [{"introduced": "0"}, {"fixed": "2.0"}],
                                            aliases=["CVE-1", "GHSA-x"], range_type="ECOSYSTEM"))
    ghsa = Advisory.from_record(osv_record("GHSA-x", "PyPI", "p", [{"introduced": "0"}, {"fixed": "2.0"}],
                                           aliases=["CVE-1"], range_type="ECOSYSTEM",
                                           severity="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"))
    found = sca.match(sca.Package("PyPI", "P", "1.0", "requirements.txt", 1), [pysec, ghsa])
    assert len(found) == 1
    assert found[0]["rule_id"] == "GHSA-x" and found[0]["aliases"] == ["CVE-1", "PYSEC-1"]
    assert found[0]["severity"] == "critical"


def test_database_error_type():
    with pytest.raises(OsvError):
        OsvDatabase(None)
