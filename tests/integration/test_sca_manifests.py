"""SCA on every manifest a real repository carries: requirements files as pip reads them,
pyproject.toml, uv.lock, pdm.lock, yarn.lock (v1, berry), pnpm-lock.yaml (v6, v9), go.mod
against the real Go advisories; incomplete results; unique and stable fingerprints."""
from __future__ import annotations

import pytest

from tests.support import sca_samples as fx
from tests.support.scanning import commit, locations, run_scanner, write_osv_db
from workers.scanners import sca
from workers.scanners.requirements import MAX_DEPTH


@pytest.fixture(scope="module")
def osv_dir(tmp_path_factory):
    return write_osv_db(tmp_path_factory.mktemp("osv") / "db", go="real")


def _scan(tmp_path, files, osv_dir):
    commit(tmp_path / "repo", files)
    return sca.scan(str(tmp_path / "repo"), str(osv_dir))


def test_requirements_includes_constraints_bom_and_names(tmp_path, osv_dir):
    result = _scan(tmp_path, {"requirements.txt": fx.REQ_MAIN, "requirements/base.txt": fx.REQ_BASE,
                              "requirements/common.txt": fx.REQ_COMMON, "constraints.txt": fx.CONSTRAINTS,
                              "dev-requirements.txt": fx.DEV_REQUIREMENTS}, osv_dir)
    assert locations(result["findings"]) == {
        ("PYSEC-2019-217", "requirements.txt", 1), ("PYSEC-2021-66", "requirements.txt", 1),  # after a BOM
        ("PYSEC-2018-28", "requirements/base.txt", 2), ("PYSEC-2023-74", "requirements/base.txt", 2),
        ("PYSEC-2020-96", "requirements/common.txt", 1), ("PYSEC-2021-142", "requirements/common.txt", 1),
        # "flask" is unpinned in requirements.txt; the -c file pins it, so the finding is there
        ("PYSEC-2018-66", "constraints.txt", 1), ("PYSEC-2019-179", "constraints.txt", 1),
        ("PYSEC-2023-62", "constraints.txt", 1),
        ("PYSEC-2023-254", "dev-requirements.txt", 1)}
    summary = result["summary"]
    assert summary["unpinned"] == [] and summary["packages_checked"] == 5  # urllib3: constraint only
    reasons = [u["reason"] for u in result["incomplete"]]
    assert reasons == [
        "-r requirements/missing.txt in requirements.txt line 5 not followed: not in the repository",
        "-r ../outside.txt in requirements.txt line 6 not followed: outside the repository",
        "-r https://example.com/remote.txt in requirements.txt line 7 not followed: a remote file "
        "(scanners never download)"]
    assert summary["unchecked"] == result["incomplete"]


def test_include_chain_depth_is_bounded_and_links_are_not_followed(tmp_path, osv_dir):
    files = {f"requirements/r{n}.txt": f"-r r{n + 1}.txt\n" for n in range(MAX_DEPTH + 1)}
    files["requirements/r0.txt"] = "-r r1.txt\n-r link.txt\n"
    files[f"requirements/r{MAX_DEPTH + 1}.txt"] = "Jinja2==2.10\n"
    commit(tmp_path / "repo", files)
    (tmp_path / "repo" / "requirements" / "link.txt").symlink_to("/etc/hostname")
    commit(tmp_path / "repo", {})
    result = sca.scan(str(tmp_path / "repo"), str(osv_dir))
    # Reached directly by its name it is read; through the chain from r0 it is 11 levels deep.
    assert any(u["reason"].startswith(f"-r r{MAX_DEPTH + 1}.txt in requirements/r{MAX_DEPTH}.txt")
               and "more than 10 levels deep" in u["reason"] for u in result["incomplete"])
    assert any("-r link.txt" in u["reason"] and "symbolic link" in u["reason"] for u in result["incomplete"])
    assert {f["path"] for f in result["findings"]} == {f"requirements/r{MAX_DEPTH + 1}.txt"}


def test_pyproject_uv_and_pdm(tmp_path, osv_dir):
    result = _scan(tmp_path, {"pyproject.toml": fx.PYPROJECT, "uv/uv.lock": fx.UV_LOCK,
                              "pdm/pdm.lock": fx.PDM_LOCK}, osv_dir)
    where = {(f["path"], f["start_line"], f["package"]["name"], f["package"]["version"])
             for f in result["findings"]}
    assert where == {("pyproject.toml", 10, "Django", "3.2.0"), ("pyproject.toml", 16, "Pillow", "8.1.0"),
                     ("uv/uv.lock", 14, "jinja2", "2.10"), ("uv/uv.lock", 25, "urllib3", "1.24.1"),
                     ("pdm/pdm.lock", 11, "pyyaml", "5.3")}
    assert ("PYSEC-2019-217", "uv/uv.lock", 14) in locations(result["findings"])
    assert ("PYSEC-2021-137", "pyproject.toml", 16) in locations(result["findings"])
    assert {(lock["path"], lock["packages"]) for lock in result["summary"]["lockfiles"]} == {
        ("pyproject.toml", 4), ("uv/uv.lock", 3), ("pdm/pdm.lock", 2)}  # editable, git, path skipped
    assert result["summary"]["unpinned"] == [{"path": "pyproject.toml", "line": 11,
                                             "requirement": "requests>=2.31", "reason": "no exact == pin"}]


def test_yarn_v1_berry_and_pnpm(tmp_path, osv_dir):
    result = _scan(tmp_path, {"y1/yarn.lock": fx.YARN_V1, "y2/yarn.lock": fx.YARN_BERRY,
                              "p6/pnpm-lock.yaml": fx.PNPM_V6, "p9/pnpm-lock.yaml": fx.PNPM_V9}, osv_dir)
    assert locations(result["findings"]) == {
        ("GHSA-test-scoped-0003", "y1/yarn.lock", 5), ("GHSA-test-lodash-0001", "y1/yarn.lock", 10),
        ("GHSA-test-minimist-0002", "y1/yarn.lock", 15), ("GHSA-test-minimist-0002", "y1/yarn.lock", 19),
        ("GHSA-test-lodash-0001", "y1/yarn.lock", 29),  # an npm: alias is checked as the real package
        ("GHSA-test-scoped-0003", "y2/yarn.lock", 8), ("GHSA-test-lodash-0001", "y2/yarn.lock", 15),
        ("GHSA-test-minimist-0002", "y2/yarn.lock", 22),
        ("GHSA-test-scoped-0003", "p6/pnpm-lock.yaml", 14), ("GHSA-test-lodash-0001", "p6/pnpm-lock.yaml", 18),
        ("GHSA-test-minimist-0002", "p6/pnpm-lock.yaml", 22),
        ("GHSA-test-scoped-0003", "p9/pnpm-lock.yaml", 17), ("GHSA-test-minimist-0002", "p9/pnpm-lock.yaml", 20)}
    # file:, workspace: and patch: entries, and a git tarball, are not registry releases
    assert {(lock["path"], lock["packages"]) for lock in result["summary"]["lockfiles"]} == {
        ("y1/yarn.lock", 6), ("y2/yarn.lock", 3), ("p6/pnpm-lock.yaml", 4), ("p9/pnpm-lock.yaml", 2)}


def test_go_mod_against_the_real_go_database(tmp_path, osv_dir):
    result = _scan(tmp_path, {"go.mod": fx.GO_MOD_REAL}, osv_dir)
    assert result["summary"]["osv_db"]["Go"]["records"] == 4291
    modules = {(f["rule_id"], f["start_line"], f["package"]["version"]) for f in result["findings"]
               if f["package"]["name"] not in ("stdlib", "toolchain")}
    assert modules == {
        # +incompatible: below 2.7.0-rc.0+incompatible and 2.8.0+incompatible
        ("GO-2021-0072", 8, "v2.6.2+incompatible"), ("GO-2022-0379", 8, "v2.6.2+incompatible"),
        # a pseudo-version older than the fixing pseudo-version 1.0.4-0.20180125103619-...
        ("GO-2020-0006", 10, "v1.0.4-0.20180101000000-0123456789ab"),
        ("GO-2020-0008", 10, "v1.0.4-0.20180101000000-0123456789ab"),
        ("GO-2020-0028", 10, "v1.0.4-0.20180101000000-0123456789ab"),
        ("GO-2021-0113", 11, "v0.3.6"), ("GO-2022-1059", 11, "v0.3.6"), ("GO-2026-5970", 11, "v0.3.6")}
    # json-patch v4.12.0+incompatible is past the fixed 3.0.1 pseudo-version; gorilla/websocket
    # v1.4.0 (GO-2020-0019) is replaced by v1.5.1; gin v1.9.1 is the fix of GO-2023-1737.
    stdlib = {f["rule_id"] for f in result["findings"] if f["package"]["name"] == "stdlib"}
    toolchain = {f["rule_id"] for f in result["findings"] if f["package"]["name"] == "toolchain"}
    assert {f["start_line"] for f in result["findings"] if f["package"]["name"] in ("stdlib", "toolchain")} == {5}
    assert "GO-2023-1621" in stdlib and "GO-2023-1568" not in stdlib  # fixed in 1.20.2 / in 1.20.1
    assert "GO-2023-1839" in toolchain and "GO-2023-1839" not in stdlib
    assert all(f["package"]["version"] == "1.20.1" for f in result["findings"]
               if f["package"]["name"] in ("stdlib", "toolchain"))


def test_go_directive_without_toolchain_and_prerelease(tmp_path, osv_dir):
    result = _scan(tmp_path, {"go.mod": "module m\n\ngo 1.21rc2\n"}, osv_dir)
    versions = {f["package"]["version"] for f in result["findings"]}
    assert versions == {"1.21.0-rc.2"} and {f["start_line"] for f in result["findings"]} == {3}
    latest = _scan(tmp_path / "new", {"go.mod": "module m\n\ngo 1.27.0\n"}, osv_dir)
    assert latest["findings"] == [] and latest["summary"]["packages_checked"] == 2


def test_missing_ecosystem_completes_what_it_can_and_says_so(tmp_path):
    db = write_osv_db(tmp_path / "db", npm=False, go=False)
    result = _scan(tmp_path, {"requirements.txt": "Jinja2==2.10\n", "web/package-lock.json": fx.PACKAGE_LOCK_V3,
                              "yarn.lock": fx.YARN_V1}, db)
    assert locations(result["findings"]) == {("PYSEC-2019-217", "requirements.txt", 1),
                                             ("PYSEC-2021-66", "requirements.txt", 1)}
    assert [(u["path"], u["ecosystem"]) for u in result["incomplete"]] == [
        ("web/package-lock.json", "npm"), ("yarn.lock", "npm")]
    assert all("has no npm advisories" in u["reason"] for u in result["incomplete"])
    assert str(db) not in str(result["incomplete"])  # no agent path in what the tenant sees
    assert result["summary"]["packages_checked"] == 1
    assert {lock["path"]: lock["checked"] for lock in result["summary"]["lockfiles"]} == {
        "requirements.txt": True, "web/package-lock.json": False, "yarn.lock": False}


def test_nothing_checkable_still_fails(tmp_path):
    db = write_osv_db(tmp_path / "db", npm=False, go=False)
    commit(tmp_path / "repo", {"web/package-lock.json": fx.PACKAGE_LOCK_V3})
    proc = run_scanner("sca", tmp_path / "repo", "--osv-db", str(db))
    assert proc.returncode == 3
    assert proc.stderr.startswith("no lockfile could be checked: web/package-lock.json: OSV database on this "
                                  "agent has no npm advisories")
    assert str(db) not in proc.stderr


def test_missing_database_error_names_no_agent_path(tmp_path):
    commit(tmp_path / "repo", {"requirements.txt": "Jinja2==2.10\n"})
    secret_place = tmp_path / "agent-data" / "osv"
    proc = run_scanner("sca", tmp_path / "repo", "--osv-db", str(secret_place))
    assert proc.returncode == 3 and "OSV_DB_DIR" in proc.stderr
    assert str(tmp_path) not in proc.stderr


# --- fingerprints ------------------------------------------------------------

def test_nested_npm_installs_get_distinct_fingerprints(tmp_path, osv_dir):
    result = _scan(tmp_path, {"web/package-lock.json": fx.PACKAGE_LOCK_V3, "legacy/package-lock.json":
                              fx.PACKAGE_LOCK_V1, "yarn.lock": fx.YARN_V1}, osv_dir)
    minimist = [f for f in result["findings"] if f["rule_id"] == "GHSA-test-minimist-0002"]
    assert len(minimist) == 6  # two copies in each lockfile
    assert len({f["fingerprint"] for f in minimist}) == 6
    fingerprints = [f["fingerprint"] for f in result["findings"]]
    assert len(fingerprints) == len(set(fingerprints))


def test_version_bump_keeps_fingerprints_of_nested_and_single_packages(tmp_path, osv_dir):
    before = _scan(tmp_path, {"package-lock.json": fx.PACKAGE_LOCK_V3}, osv_dir)["findings"]
    bumped = (fx.PACKAGE_LOCK_V3.replace('"version": "0.0.8"', '"version": "0.0.9"')
              .replace('"version": "4.17.20"', '"version": "4.17.19"'))
    commit(tmp_path / "repo", {"package-lock.json": bumped})
    after = sca.scan(str(tmp_path / "repo"), str(osv_dir))["findings"]

    def key(f):
        return (f["rule_id"], f["start_line"])
    assert {key(f): f["fingerprint"] for f in after} == {key(f): f["fingerprint"] for f in before}
    assert {f["package"]["version"] for f in after} >= {"0.0.9", "4.17.19"}


def test_same_pin_twice_in_one_file_is_two_findings(tmp_path, osv_dir):
    result = _scan(tmp_path, {"requirements.txt": "Jinja2==2.10\nJinja2==2.10\n"}, osv_dir)
    assert len(result["findings"]) == 4
    assert len({f["fingerprint"] for f in result["findings"]}) == 4
