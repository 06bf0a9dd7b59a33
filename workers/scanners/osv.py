"""The OSV database on the agent, and the OSV range evaluation.

``OSV_DB_DIR`` is laid out as osv.dev exports it: ``<Ecosystem>/all.zip`` holding one
OSV JSON record per vulnerability; a directory ``<Ecosystem>/`` of ``*.json`` records
works too. Only the records naming a package we look for are parsed, so a large export
(npm's) costs one pass over the archive, not a full JSON decode of every record.

Matching follows the OSV schema (https://ossf.github.io/osv-schema/#evaluation):
a version is affected when it is listed in ``versions`` or falls in an ``ECOSYSTEM`` or
``SEMVER`` range, walking the sorted ``introduced`` / ``fixed`` / ``last_affected``
events and honouring ``limit``; ``withdrawn`` records are ignored.
"""
from __future__ import annotations

import functools
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

__all__ = ["OsvDatabase", "OsvError", "Advisory", "is_affected", "normalize_name",
           "version_key", "ECOSYSTEMS"]

#: Ecosystems the lockfile parsers produce (osv.dev directory names).
ECOSYSTEMS = ("PyPI", "npm", "Go")

_NAME_FIELD = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class OsvError(Exception):
    """The database is missing, empty or unreadable: nothing could be checked."""


def normalize_name(ecosystem: str, name: str) -> str:
    """Package identity within an ecosystem (PEP 503 for PyPI; exact for npm and Go)."""
    if ecosystem == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


@functools.lru_cache(maxsize=65536)
def version_key(ecosystem: str, version: str):
    """A sortable key for ``version`` in ``ecosystem``; None when it does not parse."""
    if ecosystem == "PyPI":
        from packaging.version import InvalidVersion, Version
        try:
            return Version(version)
        except InvalidVersion:
            return None
    import semver
    text = version[1:] if version.startswith("v") else version
    try:
        return semver.Version.parse(text)
    except ValueError:
        # npm/Go tolerate "1.2" style versions in advisories; pad them.
        parts = text.split("-", 1)
        core = parts[0].split(".")
        if len(core) < 3 and all(p.isdigit() for p in core):
            padded = ".".join(core + ["0"] * (3 - len(core)))
            try:
                return semver.Version.parse(padded + (f"-{parts[1]}" if len(parts) > 1 else ""))
            except ValueError:
                return None
        return None


def _range_affects(ecosystem: str, version, events: list[dict]) -> bool:
    """One ECOSYSTEM/SEMVER range: the OSV evaluation algorithm."""
    limits = [e["limit"] for e in events if "limit" in e]
    if limits:
        keys = [version_key(ecosystem, v) for v in limits if v != "*"]
        if "*" not in limits and keys and all(k is not None and version >= k for k in keys):
            return False

    def sort_key(event):
        kind, value = next((k, v) for k, v in event.items() if k in
                           ("introduced", "fixed", "last_affected", "limit"))
        if kind == "introduced" and value == "0":
            return (0, None)
        key = version_key(ecosystem, value)
        return (1, key) if key is not None else (2, None)

    walk = [e for e in events if any(k in e for k in ("introduced", "fixed", "last_affected"))]
    try:
        walk.sort(key=sort_key)
    except TypeError:  # an unparseable event version: keep the advisory's own order
        pass
    affected = False
    for event in walk:
        if "introduced" in event:
            value = event["introduced"]
            key = None if value == "0" else version_key(ecosystem, value)
            if value == "0" or (key is not None and version >= key):
                affected = True
        elif "fixed" in event:
            key = version_key(ecosystem, event["fixed"])
            if key is not None and version >= key:
                affected = False
        elif "last_affected" in event:
            key = version_key(ecosystem, event["last_affected"])
            if key is not None and version > key:
                affected = False
    return affected


def is_affected(ecosystem: str, version: str, affected: dict) -> bool:
    """Whether ``version`` is affected by one ``affected[]`` entry of an OSV record."""
    plain = version[1:] if ecosystem == "Go" and version.startswith("v") else version
    listed = affected.get("versions") or []
    if version in listed or plain in listed:
        return True
    key = version_key(ecosystem, version)
    if key is None:
        return False
    if ecosystem == "PyPI" and listed:
        # pypa lists every affected release; "2.10.0" in a lockfile is release "2.10".
        if any(version_key(ecosystem, item) == key for item in listed):
            return True
    for rng in affected.get("ranges") or []:
        if rng.get("type") not in ("ECOSYSTEM", "SEMVER"):
            continue  # GIT ranges name commits, not released versions
        if _range_affects(ecosystem, key, rng.get("events") or []):
            return True
    return False


@dataclass
class Advisory:
    """One OSV record, reduced to what a finding needs."""

    id: str
    summary: str
    aliases: list[str]
    affected: list[dict]
    severity: list[dict] = field(default_factory=list)
    database_specific: dict = field(default_factory=dict)
    modified: str = ""

    @classmethod
    def from_record(cls, record: dict) -> Advisory:
        details = (record.get("details") or "").strip()
        summary = " ".join((record.get("summary") or details.split("\n\n", 1)[0]).split())
        if len(summary) > 300:
            summary = summary[:300].rsplit(" ", 1)[0] + "..."
        return cls(id=record["id"], summary=summary,
                   aliases=list(record.get("aliases") or []), affected=record.get("affected") or [],
                   severity=list(record.get("severity") or []),
                   database_specific=record.get("database_specific") or {},
                   modified=record.get("modified") or "")

    def fixed_versions(self, ecosystem: str, name: str) -> list[str]:
        fixed = []
        for entry in self.affected:
            pkg = entry.get("package") or {}
            if pkg.get("ecosystem") != ecosystem or normalize_name(ecosystem, pkg.get("name", "")) != name:
                continue
            for rng in entry.get("ranges") or []:
                if rng.get("type") in ("ECOSYSTEM", "SEMVER"):
                    fixed += [e["fixed"] for e in rng.get("events", []) if "fixed" in e]
        return sorted(set(fixed), key=lambda v: (version_key(ecosystem, v) is None, str(v)))


class OsvDatabase:
    """Advisories per ecosystem, read from ``OSV_DB_DIR``."""

    def __init__(self, root: str | os.PathLike | None):
        if not root:
            raise OsvError("OSV database not configured: set OSV_DB_DIR on the agent and run "
                           "`exploop-agent osv-sync`")
        self.root = Path(root)
        if not self.root.is_dir():
            raise OsvError("OSV database directory (OSV_DB_DIR) does not exist on this agent: run "
                           "`exploop-agent osv-sync`")
        self.available = self._sources()
        if not self.available:
            raise OsvError("OSV database (OSV_DB_DIR) on this agent is empty (no <Ecosystem>/all.zip "
                           "or JSON records): run `exploop-agent osv-sync`")
        self.stats: dict[str, dict] = {}

    def _sources(self) -> dict[str, Path]:
        found = {}
        for child in sorted(self.root.iterdir()):
            if not child.is_dir():
                continue
            archive = child / "all.zip"
            if archive.is_file() and archive.stat().st_size > 22:  # 22 bytes: an empty zip
                found[child.name] = archive
            elif any(child.glob("*.json")):
                found[child.name] = child
        return found

    def _raw_records(self, source: Path):
        if source.is_file():
            try:
                with zipfile.ZipFile(source) as archive:
                    for info in archive.infolist():
                        if info.filename.endswith(".json"):
                            yield info.filename, archive.read(info)
            except zipfile.BadZipFile:
                raise OsvError(f"OSV archive of {source.parent.name} advisories on this agent is corrupt: "
                               "run `exploop-agent osv-sync`") from None
        else:
            for path in sorted(source.glob("*.json")):
                yield path.name, path.read_bytes()

    def load(self, ecosystem: str, names: set[str]) -> dict[str, list[Advisory]]:
        """Advisories for ``names`` (normalised) in ``ecosystem``; fails when it has no data."""
        source = self.available.get(ecosystem)
        if source is None:
            raise OsvError(f"OSV database on this agent has no {ecosystem} advisories "
                           f"(have: {', '.join(sorted(self.available))}): run "
                           f"`exploop-agent osv-sync --ecosystem {ecosystem}`")
        index: dict[str, list[Advisory]] = {}
        total = withdrawn = 0
        for member, raw in self._raw_records(source):
            total += 1
            # Cheap filter before a full decode: does any "name" value concern us?
            if not any(normalize_name(ecosystem, _unescape(m)) in names
                       for m in _NAME_FIELD.findall(raw)):
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                raise OsvError(f"OSV record {os.path.basename(member)} of the {ecosystem} advisories on "
                               "this agent is not valid JSON: run `exploop-agent osv-sync`") from None
            if record.get("withdrawn"):
                withdrawn += 1
                continue
            advisory = Advisory.from_record(record)
            for entry in advisory.affected:
                pkg = entry.get("package") or {}
                if pkg.get("ecosystem", "").split(":", 1)[0] != ecosystem:
                    continue
                name = normalize_name(ecosystem, pkg.get("name", ""))
                if name in names and advisory not in index.setdefault(name, []):
                    index[name].append(advisory)
        if total == 0:
            raise OsvError(f"OSV database on this agent holds no {ecosystem} records: run "
                           "`exploop-agent osv-sync`")
        mtime = source.stat().st_mtime
        self.stats[ecosystem] = {"records": total, "source": str(source.relative_to(self.root)),
                                 "updated": _iso(mtime)}
        return index


def _unescape(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if "\\" in text:
        try:
            return json.loads(f'"{text}"')
        except ValueError:
            return text
    return text


def _iso(timestamp: float) -> str:
    from datetime import datetime
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
