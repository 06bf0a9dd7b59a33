"""Software composition analysis: the repository's lockfiles matched against OSV advisories.

Run as ``python -m workers.scanners.sca <dir> --osv-db DIR``. Lockfiles read:
requirements files as pip reads them (``==`` pins, ``-r``/``-c`` followed), ``pyproject.toml``
(PEP 621 ``==`` pins), ``poetry.lock``, ``Pipfile.lock``, ``uv.lock``, ``pdm.lock`` (PyPI);
``package-lock.json`` / ``npm-shrinkwrap.json`` v1-v3, ``yarn.lock`` v1 and berry,
``pnpm-lock.yaml`` (npm); ``go.mod`` with the standard library and toolchain of its ``go``
and ``toolchain`` directives (Go). Versions compare with ``packaging`` (PyPI) and ``semver``
(npm, Go).

"No vulnerabilities" is only ever said about packages that were checked: a lockfile that
cannot be checked (it does not parse, an include is missing, the database has no data for
its ecosystem) is listed in the document's ``incomplete`` with the reason, and a
repository where nothing could be checked fails the scan.
"""
from __future__ import annotations

import json
import os
import re
import tomllib

from . import manifests
from .common import ScanError, make_finding, number_duplicates, run_main, tracked_files
from .osv import Advisory, OsvDatabase, OsvError, is_affected, normalize_name
from .packages import LockfileError, Package
from .requirements import RequirementsFile, is_requirements_file, parse_requirements_file, read_requirements

__all__ = ["scan", "Package", "parse_lockfile", "lockfile_kind", "severity_of"]

ENGINE = "exploop-osv"

#: The ecosystem each kind of lockfile pins.
KIND_ECOSYSTEM = {"requirements": "PyPI", "pyproject": "PyPI", "poetry": "PyPI", "pipfile": "PyPI",
                  "uv": "PyPI", "pdm": "PyPI", "npm": "npm", "yarn": "npm", "pnpm": "npm", "gomod": "Go"}
_BASENAMES = {"package-lock.json": "npm", "npm-shrinkwrap.json": "npm", "yarn.lock": "yarn",
              "pnpm-lock.yaml": "pnpm", "poetry.lock": "poetry", "Pipfile.lock": "pipfile",
              "uv.lock": "uv", "pdm.lock": "pdm", "pyproject.toml": "pyproject", "go.mod": "gomod"}


def lockfile_kind(path: str) -> str | None:
    """Which parser reads ``path`` (None: not a lockfile we read)."""
    parts = path.split("/")
    if "node_modules" in parts[:-1]:
        return None  # installed dependencies' own lockfiles are not the project's
    if parts[-1] in _BASENAMES:
        return _BASENAMES[parts[-1]]
    return "requirements" if is_requirements_file(path) else None


# --- PyPI -------------------------------------------------------------------

def parse_poetry(text: str, path: str) -> list[Package]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockfileError(f"{path}: invalid TOML ({exc})") from None
    name_lines = manifests.package_name_lines(text)
    packages = []
    for n, entry in enumerate(data.get("package", [])):
        source = entry.get("source") or {}
        if source.get("type") in ("git", "directory", "file", "url"):
            continue  # not a registry release: the version says nothing about advisories
        line_number = name_lines[n] if n < len(name_lines) else 1
        packages.append(Package("PyPI", entry["name"], str(entry["version"]), path, line_number))
    return packages


class _Cursor:
    """Line numbers of JSON object keys, found in document order (json keeps that order)."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def line_of(self, key: str) -> int:
        match = re.compile('"' + re.escape(json.dumps(key)[1:-1]) + r'"\s*:\s*\{').search(self.text, self.pos)
        if not match:
            return 1
        self.pos = match.end()
        return self.text.count("\n", 0, match.start()) + 1


def _load_json(text: str, path: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise LockfileError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LockfileError(f"{path}: expected a JSON object")
    return data


def parse_pipfile_lock(text: str, path: str) -> list[Package]:
    data = _load_json(text, path)
    cursor = _Cursor(text)
    packages = []
    for section in ("default", "develop"):
        if section in data:
            cursor.line_of(section)
        for name, entry in (data.get(section) or {}).items():
            line = cursor.line_of(name)
            version = (entry or {}).get("version", "")
            if not version.startswith("=="):
                continue  # git, path or file sources carry no release version
            packages.append(Package("PyPI", name, version[2:], path, line))
    return packages


# --- npm --------------------------------------------------------------------

def parse_package_lock(text: str, path: str) -> list[Package]:
    data = _load_json(text, path)
    cursor = _Cursor(text)
    packages = []
    if "packages" in data:  # lockfileVersion 2 and 3
        cursor.line_of("packages")
        for key, entry in data["packages"].items():
            line = cursor.line_of(key)
            if not key or "node_modules/" not in key or entry.get("link"):
                continue  # the root project, workspaces and symlinks are local sources
            name = entry.get("name") or key.rsplit("node_modules/", 1)[1]
            version = entry.get("version")
            if version and not entry.get("resolved", "").startswith("file:"):
                packages.append(Package("npm", name, version, path, line, instance=key))
        return packages

    def walk(deps: dict, parent: str = "") -> None:  # lockfileVersion 1: a nested tree
        for name, entry in deps.items():
            install = f"{parent}node_modules/{name}"
            line = cursor.line_of(name)
            version = entry.get("version", "")
            real = name
            if version.startswith("npm:"):  # an alias: "npm:real-name@1.2.3"
                real, _, version = version[4:].rpartition("@")
            if version and not re.match(r"^(file|git|github|http|https|link):", version):
                packages.append(Package("npm", real, version, path, line, instance=install))
            walk(entry.get("dependencies") or {}, install + "/")

    if "dependencies" in data:
        cursor.line_of("dependencies")
    walk(data.get("dependencies") or {})
    return packages


# --- Go ---------------------------------------------------------------------

def go_release(text: str) -> str | None:
    """A Go release as the vulnerability database writes it: ``1.21`` -> ``1.21.0``,
    ``go1.21rc2`` -> ``1.21.0-rc.2``; None when it is not a release number."""
    match = re.match(r"^(?:go)?(\d+)\.(\d+)(?:\.(\d+))?(?:(rc|beta)(\d+))?$", text)
    if not match:
        return None
    major, minor, patch, kind, number = match.groups()
    return f"{major}.{minor}.{patch or 0}" + (f"-{kind}.{number}" if kind else "")


def parse_go_mod(text: str, path: str) -> list[Package]:
    """``require`` (with ``replace``), and the standard library and toolchain version:
    the ``toolchain`` directive when present, else the ``go`` directive (the minimum)."""
    requires: list[tuple[str, str, int]] = []
    replaces: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    release: dict[str, tuple[str, int]] = {}
    block = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        directive = re.match(r"^(go|toolchain)\s+(\S+)$", line) if not block else None
        version = go_release(directive.group(2)) if directive else None
        if directive and version:
            release[directive.group(1)] = (version, number)
            continue
        if block:
            if line == ")":
                block = None
                continue
            body = line
        else:
            match = re.match(r"^(require|replace|exclude|retract)\s*(\()?\s*(.*)$", line)
            if not match:
                continue
            if match.group(2):
                block = match.group(1)
                continue
            block_kind, body = match.group(1), match.group(3)
            _go_directive(block_kind, body, number, requires, replaces)
            continue
        _go_directive(block, body, number, requires, replaces)
    packages = []
    for module, version, number in requires:
        target = replaces.get((module, version)) or replaces.get((module, None))
        if target is not None:
            module, replaced_by = target
            if replaced_by is None:
                continue  # replaced by a local directory
            version = replaced_by
        packages.append(Package("Go", module, version, path, number))
    version_line = release.get("toolchain") or release.get("go")
    if version_line:
        version, number = version_line
        packages += [Package("Go", "stdlib", version, path, number),
                     Package("Go", "toolchain", version, path, number)]
    return packages


def _go_directive(kind, body, number, requires, replaces) -> None:
    fields = body.split()
    if kind == "require" and len(fields) >= 2:
        requires.append((fields[0].strip('"'), fields[1], number))
    elif kind == "replace" and "=>" in fields:
        arrow = fields.index("=>")
        old, new = fields[:arrow], fields[arrow + 1:]
        key = (old[0], old[1] if len(old) > 1 else None)
        if new and (new[0].startswith(("./", "../", "/")) or len(new) == 1):
            replaces[key] = (new[0], None)
        elif len(new) >= 2:
            replaces[key] = (new[0], new[1])


def parse_lockfile(kind: str, text: str, path: str) -> tuple[list[Package], list[dict]]:
    """Packages with exact versions in one lockfile, and entries that could not be checked.

    Requirements files are not lockfiles: ``scan`` reads them with their includes
    (``read_requirements``)."""
    if kind == "pyproject":
        return manifests.parse_pyproject(text, path)
    parser = {"poetry": parse_poetry, "pipfile": parse_pipfile_lock, "npm": parse_package_lock,
              "gomod": parse_go_mod, "uv": manifests.parse_uv_lock, "pdm": manifests.parse_pdm_lock,
              "yarn": manifests.parse_yarn_lock, "pnpm": manifests.parse_pnpm_lock}[kind]
    return parser(text, path), []


# --- matching ---------------------------------------------------------------

_LEVELS = ((9.0, "critical"), (7.0, "high"), (4.0, "medium"), (0.1, "low"), (0.0, "info"))
_DB_SEVERITY = {"CRITICAL": "critical", "HIGH": "high", "MODERATE": "medium", "MEDIUM": "medium",
                "LOW": "low"}


def severity_of(advisory: Advisory) -> tuple[str, str | None]:
    """(severity, where it came from): the highest CVSS base score, else the database's word."""
    from cvss import CVSS2, CVSS3, CVSS4
    from cvss.exceptions import CVSSError

    best = None
    for entry in advisory.severity:
        vector, kind = entry.get("score", ""), entry.get("type", "")
        try:
            if kind == "CVSS_V4":
                score = float(CVSS4(vector).base_score)
            elif kind == "CVSS_V3":
                score = float(CVSS3(vector).base_score)
            elif kind == "CVSS_V2":
                score = float(CVSS2(vector).base_score)
            else:
                continue
        except (CVSSError, ValueError, KeyError):
            continue
        if best is None or score > best[0]:
            best = (score, kind)
    if best is not None:
        level = next(name for floor, name in _LEVELS if best[0] >= floor)
        return level, f"{best[1]} {best[0]:.1f}"
    word = str(advisory.database_specific.get("severity", "")).upper()
    if word in _DB_SEVERITY:
        return _DB_SEVERITY[word], f"database severity {word}"
    return "medium", None


_ID_PREFERENCE = ("GHSA-", "PYSEC-", "GO-", "CVE-")


def _primary(group: list[Advisory]) -> Advisory:
    def rank(adv: Advisory):
        prefix = next((n for n, p in enumerate(_ID_PREFERENCE) if adv.id.startswith(p)), len(_ID_PREFERENCE))
        return (prefix, adv.id)
    return min(group, key=rank)


def _group(advisories: list[Advisory]) -> list[list[Advisory]]:
    """Records that alias each other (PYSEC-x and GHSA-y for one flaw) form one finding."""
    groups: list[tuple[set, list[Advisory]]] = []
    for adv in sorted(advisories, key=lambda a: a.id):
        ids = {adv.id, *adv.aliases}
        merged = [g for g in groups if g[0] & ids]
        for g in merged:
            groups.remove(g)
            ids |= g[0]
        groups.append((ids, [adv] + [a for g in merged for a in g[1]]))
    return [members for _, members in groups]


def match(package: Package, advisories: list[Advisory], instance: str = "") -> list[dict]:
    """Findings for one package: one per group of aliased advisories that affect it."""
    name = normalize_name(package.ecosystem, package.name)
    hits = []
    for adv in advisories:
        for entry in adv.affected:
            pkg = entry.get("package") or {}
            if pkg.get("ecosystem", "").split(":", 1)[0] != package.ecosystem \
                    or normalize_name(package.ecosystem, pkg.get("name", "")) != name:
                continue
            if is_affected(package.ecosystem, package.version, entry):
                hits.append(adv)
                break
    findings = []
    for group in _group(hits):
        primary = _primary(group)
        aliases = sorted({a for adv in group for a in (adv.id, *adv.aliases)} - {primary.id})
        levels = [severity_of(adv) for adv in group]
        order = [name for _, name in _LEVELS]
        scored = [lv for lv in levels if lv[1]]
        severity, basis = min(scored, key=lambda lv: order.index(lv[0])) if scored else ("medium", None)
        fixed = sorted({v for adv in group for v in adv.fixed_versions(package.ecosystem, name)})
        cwes = [c for adv in group for c in adv.database_specific.get("cwe_ids", []) or []]
        message = (f"{package.name} {package.version} ({package.ecosystem}) is affected by {primary.id}"
                   + (f" (aliases: {', '.join(aliases)})" if aliases else "")
                   + f": {(primary.summary or 'see the advisory').rstrip('.')}."
                   + (f" Fixed in: {', '.join(fixed)}." if fixed else " No fixed version is known.")
                   + (f" Severity from {basis}." if basis else " The advisory gives no severity score."))
        findings.append(make_finding(
            engine=ENGINE, rule_id=primary.id, severity=severity, confidence="high",
            path=package.path, start_line=package.line, end_line=package.line,
            cwe=cwes[0] if cwes else None, message=message,
            basis=f"{package.ecosystem}|{name}" + (f"|{instance}" if instance else ""),
            package={"ecosystem": package.ecosystem, "name": package.name,
                     "version": package.version}, aliases=aliases, fixed=fixed))
    return findings


class _Repository:
    """Reads the checkout's files: tracked, not links, UTF-8 (a byte-order mark is ignored)."""

    def __init__(self, root: str):
        self.root = root
        self.tracked = set(tracked_files(root))

    def text(self, path: str) -> str:
        """The file's text; raises LockfileError saying why it cannot be read."""
        if path not in self.tracked:
            raise LockfileError("not in the repository")
        full = os.path.join(self.root, path)
        if os.path.islink(full):
            raise LockfileError("a symbolic link (never followed)")
        try:
            with open(full, encoding="utf-8-sig") as handle:
                return handle.read()
        except UnicodeDecodeError:
            raise LockfileError("not UTF-8 text") from None
        except OSError as exc:
            raise LockfileError(f"cannot be read ({exc.__class__.__name__})") from None

    def requirements(self, path: str) -> RequirementsFile | str:
        try:
            return parse_requirements_file(self.text(path), path)
        except LockfileError as exc:
            return str(exc)


def instances(packages: list[Package]) -> dict[Package, str]:
    """What tells apart several copies of one package in one lockfile (none when it is alone,
    so a version bump keeps the fingerprint): the install path or descriptors, else the version."""
    groups: dict[tuple, list[Package]] = {}
    for package in packages:
        key = (package.path, package.ecosystem, normalize_name(package.ecosystem, package.name))
        groups.setdefault(key, []).append(package)
    return {p: (p.instance or p.version) if len(group) > 1 else "" for group in groups.values() for p in group}


def scan(root: str, osv_db: str | None) -> dict:
    """Read the lockfiles of ``root`` and match every pinned package against OSV."""
    root = os.path.abspath(root)
    try:
        database = OsvDatabase(osv_db)
    except OsvError as exc:
        raise ScanError(str(exc)) from None
    repository = _Repository(root)
    found: dict[str, list[Package]] = {}  # lockfile path -> its packages
    kinds: dict[str, str] = {}
    unpinned: list[dict] = []
    unchecked: list[dict] = []
    requirement_files = []
    for path in sorted(repository.tracked):
        kind = lockfile_kind(path)
        if kind is None or os.path.islink(os.path.join(root, path)):
            continue  # never follow a link out of the checkout (the agent checks links out as files)
        if kind == "requirements":
            requirement_files.append(path)
            continue
        try:
            packages, skipped = parse_lockfile(kind, repository.text(path), path)
        except LockfileError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            unchecked.append({"path": path, "ecosystem": KIND_ECOSYSTEM[kind], "reason": reason})
            continue
        found[path], kinds[path] = packages, kind
        unpinned += skipped
    packages, skipped, not_followed, files_read = read_requirements(requirement_files, repository.requirements)
    unpinned += skipped
    unchecked += not_followed
    for path in files_read:
        found[path], kinds[path] = [p for p in packages if p.path == path], "requirements"
    findings, checked = [], []
    for ecosystem in sorted({KIND_ECOSYSTEM[k] for k in kinds.values()}):
        paths = [p for p in sorted(found) if KIND_ECOSYSTEM[kinds[p]] == ecosystem]
        members = [p for path in paths for p in found[path]]
        try:
            index = database.load(ecosystem, {normalize_name(ecosystem, p.name) for p in members})
        except OsvError as exc:
            unchecked += [{"path": path, "ecosystem": ecosystem, "reason": str(exc)} for path in paths]
            continue
        checked += paths
        for package, instance in instances(members).items():
            advisories = index.get(normalize_name(ecosystem, package.name))
            if advisories:
                findings += match(package, advisories, instance)
    if unchecked and not checked:
        raise ScanError("no lockfile could be checked: " + "; ".join(
            f"{u['path']}: {u['reason']}" for u in unchecked[:5]) + (" ..." if len(unchecked) > 5 else ""))
    number_duplicates(findings)  # the same pin twice in one file: still one finding each
    findings.sort(key=lambda f: (f["path"], f["start_line"] or 0, f["rule_id"]))
    checked_packages = [p for path in checked for p in found[path]]
    summary = {
        "osv_db": database.stats,
        "lockfiles": [{"path": path, "ecosystem": KIND_ECOSYSTEM[kinds[path]], "packages": len(found[path]),
                       "checked": path in checked} for path in sorted(found)],
        "packages_checked": len(checked_packages),
        "vulnerable_packages": len({(f["path"], f["package"]["name"], f["package"]["version"])
                                    for f in findings}),
        "unpinned": unpinned[:100],
        "unpinned_count": len(unpinned),
        "unchecked": unchecked[:100],
    }
    if not found and not unchecked:
        summary["note"] = ("no supported lockfile found (requirements files, pyproject.toml, poetry.lock, "
                           "Pipfile.lock, uv.lock, pdm.lock, package-lock.json, yarn.lock, pnpm-lock.yaml, "
                           "go.mod): no package was checked")
    document = {"engines": [{"name": ENGINE, "version": _version()}], "findings": findings,
                "summary": summary}
    if unchecked:
        document["incomplete"] = unchecked[:100]
    return document


def _version() -> str:
    # The distribution's version, without importing the Flask application package.
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("exploop")
    except PackageNotFoundError:
        return "unknown"


def _configure(parser) -> None:
    parser.add_argument("--osv-db", default=None, help="OSV database directory (OSV_DB_DIR)")


if __name__ == "__main__":
    run_main("sca", lambda args: scan(args.repo, args.osv_db), _configure)
