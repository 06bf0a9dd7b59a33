"""pip requirements files read the way pip reads them.

``-r other.txt`` and ``-c constraints.txt`` are followed relative to the including file,
inside the checkout only (never a link, never ``..`` out of it, never a URL), each file
once (cycles end there) and at most ``MAX_DEPTH`` includes deep. A constraint pins a
requirement that names no exact version, as pip would install it: the finding is then on
the constraint's line. A UTF-8 byte-order mark is ignored, as pip ignores it.

We parse ourselves rather than with ``pip-requirements-parser``: that library follows
includes by opening whatever path a line names (outside the checkout too) and loses
which file pinned what once nested files are merged, while here every package keeps
the file and line that pin it.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .osv import normalize_name
from .packages import Package

__all__ = ["RequirementsFile", "exact_pin", "parse_requirements_file", "read_requirements", "is_requirements_file",
           "MAX_DEPTH"]

#: How many ``-r``/``-c`` levels are followed below a requirements file.
MAX_DEPTH = 10

_INCLUDE = re.compile(r"^(-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+|(?<=^-r)|(?<=^-c))(\S.*)$")


def is_requirements_file(path: str) -> bool:
    """``requirements*.txt``, ``*-requirements.txt`` and ``requirements/*.txt``."""
    parts = path.split("/")
    base = parts[-1]
    if not base.endswith(".txt"):
        return False
    return (base.startswith("requirements") or base.endswith("-requirements.txt")
            or (len(parts) > 1 and parts[-2] == "requirements"))


@dataclass
class _Line:
    name: str
    line: int
    text: str
    version: str | None  # the exact pin, None when not pinned with ==
    reason: str = ""


@dataclass
class RequirementsFile:
    """One file's requirements, in order, and the files it includes."""

    path: str
    requirements: list[_Line] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)
    includes: list[tuple[str, str, int]] = field(default_factory=list)  # (kind r|c, target, line)


def _logical_lines(text: str):
    """(first physical line number, logical line) with continuations joined, comments removed."""
    logical, start = "", 0
    for number, raw in enumerate(text.lstrip("\ufeff").splitlines() + [""], start=1):
        if not logical:
            start = number
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += raw
        line, logical = logical, ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            yield start, line


def exact_pin(requirement: str) -> tuple[str | None, str | None, str]:
    """(name, version, why not) of one PEP 508 requirement: the version only for an exact
    ``==`` pin of a released version; no name for an invalid requirement."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None, None, "not a valid requirement"
    specs = list(req.specifier)
    if req.url is None and len(specs) == 1 and specs[0].operator in ("==", "===") and "*" not in specs[0].version:
        return req.name, specs[0].version, ""
    return req.name, None, "no exact == pin"


def parse_requirements_file(text: str, path: str) -> RequirementsFile:
    """Requirements, pins and includes of one file (includes are not followed here)."""
    result = RequirementsFile(path)
    for number, line in _logical_lines(text):
        include = _INCLUDE.match(line)
        if include:
            kind = "c" if include.group(1) in ("-c", "--constraint") else "r"
            result.includes.append((kind, include.group(2).strip(), number))
            continue
        line = re.sub(r"\s--hash[=\s]\S+", "", line).strip()
        if line.startswith("-"):
            continue  # -e (a local or VCS source), --index-url...: no released version to check
        name, version, why = exact_pin(line)
        if name is None:
            result.invalid.append({"path": path, "line": number, "requirement": line[:200], "reason": why})
            continue
        result.requirements.append(_Line(name, number, line[:200], version, why))
    return result


def _target(including: str, target: str) -> tuple[str | None, str]:
    """The repository path an include names, or (None, why it is not followed)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", target):
        return None, "a remote file (scanners never download)"
    if target.startswith("/"):
        return None, "an absolute path outside the repository"
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(including), target))
    if joined == ".." or joined.startswith("../"):
        return None, "outside the repository"
    return joined, ""


def read_requirements(tops: list[str], load: Callable[[str], RequirementsFile | str]
                      ) -> tuple[list[Package], list[dict], list[dict], list[str]]:
    """Read ``tops`` and everything they include.

    ``load(path)`` returns the parsed file, or a string saying why it cannot be read.
    Returns (packages, unpinned requirements, unchecked includes, every file read).
    """
    packages: dict[tuple, Package] = {}
    unpinned: dict[tuple, dict] = {}
    unchecked: dict[tuple, dict] = {}
    files_read: list[str] = []
    cache: dict[str, RequirementsFile | str] = {}

    def get(path: str) -> RequirementsFile | str:
        if path not in cache:
            cache[path] = load(path)
            if isinstance(cache[path], RequirementsFile):
                files_read.append(path)
        return cache[path]

    def walk(top: str) -> tuple[list[RequirementsFile], dict[str, tuple[str, str, int]]]:
        """The files ``top`` requires (itself first) and the pins its constraints set."""
        closure: list[RequirementsFile] = []
        constraints: dict[str, tuple[str, str, int]] = {}  # name -> (version, path, line)
        seen: set[tuple[str, str]] = set()

        def visit(path: str, mode: str, depth: int) -> None:
            if (path, mode) in seen:
                return  # a cycle, or a file already included: read once
            seen.add((path, mode))
            parsed = get(path)
            if isinstance(parsed, str):
                return
            if mode == "r":
                closure.append(parsed)
            else:
                for req in parsed.requirements:
                    if req.version is not None:
                        constraints.setdefault(normalize_name("PyPI", req.name), (req.version, path, req.line))
            for kind, target, number in parsed.includes:
                where = f"{'-c' if kind == 'c' else '-r'} {target} in {path} line {number}"
                resolved, why = _target(path, target)
                if resolved is not None and depth + 1 > MAX_DEPTH:
                    resolved, why = None, f"included more than {MAX_DEPTH} levels deep"
                if resolved is not None:
                    state = get(resolved)
                    if isinstance(state, str):
                        resolved, why = None, state
                if resolved is None:
                    unchecked.setdefault((path, number), {"path": path, "ecosystem": "PyPI",
                                                          "reason": f"{where} not followed: {why}"})
                    continue
                # Inside a constraints file, every include only constrains.
                visit(resolved, "c" if mode == "c" or kind == "c" else "r", depth + 1)

        visit(top, "r", 0)
        return closure, constraints

    for top in tops:
        if isinstance(get(top), str):
            unchecked.setdefault((top, 0), {"path": top, "ecosystem": "PyPI", "reason": get(top)})
            continue
        closure, constraints = walk(top)
        for parsed in closure:
            unpinned.update({(i["path"], i["line"]): i for i in parsed.invalid})
            for req in parsed.requirements:
                if req.version is not None:
                    packages[(parsed.path, req.line, req.name)] = Package(
                        "PyPI", req.name, req.version, parsed.path, req.line)
                elif normalize_name("PyPI", req.name) in constraints:
                    version, where, number = constraints[normalize_name("PyPI", req.name)]
                    packages[(where, number, req.name)] = Package("PyPI", req.name, version, where, number)
                else:
                    unpinned.setdefault((parsed.path, req.line), {
                        "path": parsed.path, "line": req.line, "requirement": req.text, "reason": req.reason})
    # A requirement left unpinned under one top file but pinned by a constraint elsewhere
    # is still unpinned where no constraint applied: keep both, pip installs differ per file.
    return list(packages.values()), sorted(unpinned.values(), key=lambda i: (i["path"], i["line"])), \
        list(unchecked.values()), files_read
