"""Parsers of the manifests and lockfiles beyond requirements, poetry, Pipfile and npm's own.

``pyproject.toml`` (PEP 621, ``==`` pins only), ``uv.lock``, ``pdm.lock`` (PyPI);
``yarn.lock`` v1 and berry, ``pnpm-lock.yaml`` v5 to v9 (npm). Only packages resolved
from a registry are returned: a git, path, workspace or patched source has no released
version an advisory could name. Every parser gives the line that pins each package.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Callable

from .packages import LockfileError, Package
from .requirements import exact_pin

__all__ = ["parse_pyproject", "parse_uv_lock", "parse_pdm_lock", "parse_yarn_lock", "parse_pnpm_lock"]


def _toml(text: str, path: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockfileError(f"{path}: invalid TOML ({exc})") from None


def package_name_lines(text: str) -> list[int]:
    """Line of each ``[[package]]`` table's ``name =`` key, in document order."""
    lines, in_package = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_package = stripped == "[[package]]"
        elif in_package and re.match(r"^name\s*=", stripped):
            lines.append(number)
            in_package = False
    return lines


# --- PyPI -------------------------------------------------------------------

def parse_pyproject(text: str, path: str) -> tuple[list[Package], list[dict]]:
    """PEP 621 ``[project]`` dependencies and optional dependencies; ``==`` pins are checked."""
    project = _toml(text, path).get("project") or {}
    entries = list(project.get("dependencies") or [])
    for group in (project.get("optional-dependencies") or {}).values():
        entries += list(group or [])
    lines = text.splitlines()
    packages, unpinned, cursor = [], [], 0
    for entry in entries:
        if not isinstance(entry, str):
            continue
        number, cursor = _find_string(lines, entry, cursor)
        name, version, why = exact_pin(entry)
        if name is not None and version is not None:
            packages.append(Package("PyPI", name, version, path, number))
        else:
            unpinned.append({"path": path, "line": number, "requirement": entry[:200], "reason": why})
    return packages, unpinned


def _find_string(lines: list[str], value: str, start: int) -> tuple[int, int]:
    """(1-based line, index) of the first line from ``start`` quoting ``value``."""
    for quote in ('"', "'"):
        needle = f"{quote}{value}{quote}"
        for index in range(start, len(lines)):
            if needle in lines[index]:
                return index + 1, index
    return 1, start


def _toml_lock(text: str, path: str, registry: Callable[[dict], bool]) -> list[Package]:
    data = _toml(text, path)
    name_lines = package_name_lines(text)
    packages = []
    for n, entry in enumerate(data.get("package") or []):
        if not isinstance(entry, dict) or "name" not in entry or "version" not in entry:
            continue
        if not registry(entry):
            continue
        line = name_lines[n] if n < len(name_lines) else 1
        packages.append(Package("PyPI", entry["name"], str(entry["version"]), path, line))
    return packages


def parse_uv_lock(text: str, path: str) -> list[Package]:
    """uv's lockfile: packages whose ``source`` is a registry (not the project, git or a path)."""
    return _toml_lock(text, path, lambda e: "registry" in (e.get("source") or {}))


def parse_pdm_lock(text: str, path: str) -> list[Package]:
    """PDM's lockfile: packages without a ``git``, ``path``, ``url`` or editable source."""
    local = ("git", "path", "url", "editable", "revision")
    return _toml_lock(text, path, lambda e: not any(e.get(k) for k in local))


# --- npm --------------------------------------------------------------------

def _split_descriptor(descriptor: str) -> tuple[str, str]:
    """``@scope/name@range`` -> (name, range); an npm alias ``a@npm:b@^1`` -> (b, ^1)."""
    descriptor = descriptor.strip().strip('"')
    at = descriptor.find("@", 1)
    if at < 0:
        return descriptor, ""
    name, rng = descriptor[:at], descriptor[at + 1:]
    if rng.startswith("npm:") and "@" in rng[5:]:
        real = rng[4:]
        at = real.find("@", 1)
        if at > 0:
            return real[:at], real[at + 1:]
    return name, rng


_LOCAL_RANGE = re.compile(r"^(file|link|portal|workspace|git|git\+\S+|github|https?|exec|patch):")


def parse_yarn_lock(text: str, path: str) -> list[Package]:
    """yarn.lock v1 (its own format) and berry (YAML): one entry per resolved version."""
    packages: list[Package] = []
    entry: dict | None = None

    def flush() -> None:
        if not entry or not entry.get("version"):
            return
        descriptors = [d.strip() for d in entry["key"].split(",") if d.strip()]
        if not descriptors:
            return
        name, rng = _split_descriptor(descriptors[0])
        resolution = entry.get("resolution")
        if resolution is not None:  # berry: the resolution names the real package and protocol
            real, protocol = _split_descriptor(resolution)
            if not protocol.startswith("npm:"):
                return  # workspace:, patch:, link:, git, file: not a registry release
            name = real
        elif _LOCAL_RANGE.match(rng) or str(entry.get("resolved", "")).startswith("file:"):
            return
        version = entry["version"]
        if version.endswith("-use.local"):
            return
        instance = ", ".join(sorted(_split_descriptor(d)[1] for d in descriptors))
        packages.append(Package("npm", name, version, path, entry["line"], instance))

    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            flush()
            key = raw.rstrip().rstrip(":")
            entry = None if key == "__metadata" else {"key": key, "line": number}
            continue
        if entry is None or raw.startswith("    "):
            continue  # nested maps (dependencies) are not this entry's own fields
        match = re.match(r'^\s+(version|resolution|resolved):?\s+"?([^"]*)"?\s*$', raw)
        if match:
            entry[match.group(1)] = match.group(2)
    flush()
    return packages


def parse_pnpm_lock(text: str, path: str) -> list[Package]:
    """pnpm-lock.yaml v5 (``/name/1.0.0``), v6 (``/name@1.0.0``) and v9 (``name@1.0.0``)."""
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise LockfileError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise LockfileError(f"{path}: expected a YAML mapping")
    section = next((value for key, value in root.value if key.value == "packages"), None)
    if not isinstance(section, yaml.MappingNode):
        return []
    packages = []
    for key, value in section.value:
        fields = {k.value: v.value for k, v in value.value
                  if isinstance(v, yaml.ScalarNode)} if isinstance(value, yaml.MappingNode) else {}
        parsed = _pnpm_key(str(key.value))
        if parsed is None:
            continue
        name, version = parsed
        name, version = fields.get("name") or name, fields.get("version") or version
        if not re.match(r"^\d+\.\d+\.\d+", version or ""):
            continue  # a tarball, git or directory source
        resolution = next((v for k, v in value.value if k.value == "resolution"), None) \
            if isinstance(value, yaml.MappingNode) else None
        if isinstance(resolution, yaml.MappingNode) and any(
                k.value in ("directory", "repo", "type") for k, _ in resolution.value):
            continue
        packages.append(Package("npm", name, version, path, key.start_mark.line + 1))
    return packages


def _pnpm_key(key: str) -> tuple[str, str] | None:
    key = re.sub(r"\(.*$", "", key)  # v6/v9 peer-dependency suffix: (react@18.2.0)
    if key.startswith(("file:", "link:", "github.com/", "git+", "http")):
        return None
    key = key.lstrip("/")
    at = key.find("@", 1)
    if at > 0:  # v6, v9: name@version
        return key[:at], key[at + 1:]
    match = re.match(r"^((?:@[^/]+/)?[^/]+)/([^/_]+)", key)  # v5: name/version_peer@x
    return (match.group(1), match.group(2)) if match else None
