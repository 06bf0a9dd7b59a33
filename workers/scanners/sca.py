"""Software composition analysis: the repository's lockfiles matched against OSV advisories.

Run as ``python -m workers.scanners.sca <dir> --osv-db DIR``. Lockfiles read:
``requirements*.txt`` (``==`` pins), ``poetry.lock``, ``Pipfile.lock`` (PyPI),
``package-lock.json`` / ``npm-shrinkwrap.json`` v1-v3 (npm) and ``go.mod`` (Go).
Versions compare with ``packaging`` (PyPI) and ``semver`` (npm, Go). A missing or empty
database, or one without the ecosystem a lockfile needs, fails the scan: "no
vulnerabilities" is only ever said about packages that were checked.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass

from .common import ScanError, make_finding, run_main, tracked_files
from .osv import Advisory, OsvDatabase, OsvError, is_affected, normalize_name

__all__ = ["scan", "Package", "parse_lockfile", "lockfile_kind", "severity_of"]

ENGINE = "exploop-osv"


@dataclass(frozen=True)
class Package:
    ecosystem: str
    name: str
    version: str
    path: str
    line: int


class LockfileError(ScanError):
    pass


def lockfile_kind(path: str) -> str | None:
    """Which parser reads ``path`` (None: not a lockfile we read)."""
    parts = path.split("/")
    if "node_modules" in parts[:-1]:
        return None  # installed dependencies' own lockfiles are not the project's
    base = parts[-1]
    if base in ("package-lock.json", "npm-shrinkwrap.json"):
        return "npm"
    if base == "poetry.lock":
        return "poetry"
    if base == "Pipfile.lock":
        return "pipfile"
    if base == "go.mod":
        return "gomod"
    if base.endswith(".txt") and (base.startswith("requirements")
                                  or (len(parts) > 1 and parts[-2] == "requirements")):
        return "requirements"
    return None


# --- PyPI -------------------------------------------------------------------

def parse_requirements(text: str, path: str) -> tuple[list[Package], list[dict]]:
    """``name==version`` pins; anything else is reported as unpinned (not checked)."""
    from packaging.requirements import InvalidRequirement, Requirement

    packages, unpinned = [], []
    logical, start = "", 0
    lines = text.splitlines()
    for number, raw in enumerate(lines + [""], start=1):
        if not logical:
            start = number
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += raw
        line, logical = logical, ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        line = re.sub(r"\s--hash[=\s]\S+", "", line).strip()
        if not line or line.startswith("-"):
            continue  # options (-r, -c, -e, --index-url...) carry no pinned version
        try:
            req = Requirement(line)
        except InvalidRequirement:
            unpinned.append({"path": path, "line": start, "requirement": line[:200],
                             "reason": "not a valid requirement"})
            continue
        specs = list(req.specifier)
        if req.url is None and len(specs) == 1 and specs[0].operator in ("==", "===") \
                and "*" not in specs[0].version:
            packages.append(Package("PyPI", req.name, specs[0].version, path, start))
        else:
            unpinned.append({"path": path, "line": start, "requirement": line[:200],
                             "reason": "no exact == pin"})
    return packages, unpinned


def parse_poetry(text: str, path: str) -> list[Package]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockfileError(f"{path}: invalid TOML ({exc})") from None
    # [[package]] blocks appear in document order; find each one's name line.
    name_lines = []
    in_package = False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_package = stripped == "[[package]]"
        elif in_package and re.match(r'^name\s*=', stripped):
            name_lines.append(number)
            in_package = False
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
                packages.append(Package("npm", name, version, path, line))
        return packages

    def walk(deps: dict) -> None:  # lockfileVersion 1: a nested tree
        for name, entry in deps.items():
            line = cursor.line_of(name)
            version = entry.get("version", "")
            real = name
            if version.startswith("npm:"):  # an alias: "npm:real-name@1.2.3"
                real, _, version = version[4:].rpartition("@")
            if version and not re.match(r"^(file|git|github|http|https|link):", version):
                packages.append(Package("npm", real, version, path, line))
            walk(entry.get("dependencies") or {})

    if "dependencies" in data:
        cursor.line_of("dependencies")
    walk(data.get("dependencies") or {})
    return packages


# --- Go ---------------------------------------------------------------------

def parse_go_mod(text: str, path: str) -> list[Package]:
    requires: list[tuple[str, str, int]] = []
    replaces: dict[tuple[str, str | None], tuple[str, str | None]] = {}
    block = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("//", 1)[0].strip()
        if not line:
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
    """Packages with exact versions in one lockfile, and entries that could not be checked."""
    if kind == "requirements":
        return parse_requirements(text, path)
    parser = {"poetry": parse_poetry, "pipfile": parse_pipfile_lock, "npm": parse_package_lock,
              "gomod": parse_go_mod}[kind]
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


def match(package: Package, advisories: list[Advisory]) -> list[dict]:
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
            basis=f"{package.ecosystem}|{name}",
            package={"ecosystem": package.ecosystem, "name": package.name,
                     "version": package.version}, aliases=aliases, fixed=fixed))
    return findings


def scan(root: str, osv_db: str | None) -> dict:
    """Read the lockfiles of ``root`` and match every pinned package against OSV."""
    root = os.path.abspath(root)
    try:
        database = OsvDatabase(osv_db)
    except OsvError as exc:
        raise ScanError(str(exc)) from None
    lockfiles, packages, unpinned = [], [], []
    for path in sorted(tracked_files(root)):
        kind = lockfile_kind(path)
        if kind is None:
            continue
        if os.path.islink(os.path.join(root, path)):
            continue  # never follow a link out of the checkout (the agent checks links out as files)
        try:
            with open(os.path.join(root, path), encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ScanError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
        found, skipped = parse_lockfile(kind, text, path)
        packages += found
        unpinned += skipped
        ecosystems = sorted({p.ecosystem for p in found}) or [
            {"requirements": "PyPI", "poetry": "PyPI", "pipfile": "PyPI", "npm": "npm", "gomod": "Go"}[kind]]
        lockfiles.append({"path": path, "ecosystem": ecosystems[0], "packages": len(found)})
    findings = []
    for ecosystem in sorted({p.ecosystem for p in packages}):
        members = [p for p in packages if p.ecosystem == ecosystem]
        try:
            index = database.load(ecosystem, {normalize_name(ecosystem, p.name) for p in members})
        except OsvError as exc:
            raise ScanError(str(exc)) from None
        for package in members:
            advisories = index.get(normalize_name(ecosystem, package.name))
            if advisories:
                findings += match(package, advisories)
    findings.sort(key=lambda f: (f["path"], f["start_line"] or 0, f["rule_id"]))
    summary = {
        "osv_db": database.stats,
        "lockfiles": lockfiles,
        "packages_checked": len(packages),
        "vulnerable_packages": len({(f["path"], f["package"]["name"], f["package"]["version"])
                                    for f in findings}),
        "unpinned": unpinned[:100],
        "unpinned_count": len(unpinned),
    }
    if not lockfiles:
        summary["note"] = ("no supported lockfile found (requirements*.txt, poetry.lock, Pipfile.lock,"
                           " package-lock.json, go.mod): no package was checked")
    return {"engines": [{"name": ENGINE, "version": _version()}], "findings": findings,
            "summary": summary}


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
