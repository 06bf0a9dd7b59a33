"""What every scanner shares: the finding shape, stable fingerprints, the process entry point.

A scanner runs as ``python -m workers.scanners.<name> <repo> [options]`` in its own
process and prints one JSON document::

    {"engines": [{"name": ..., "version": ...}], "findings": [...], "summary": {...}}

or exits non-zero with one line on stderr that says what went wrong.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

from exploop.vocabulary import SEVERITIES

__all__ = ["ScanError", "make_finding", "fingerprint", "code_basis", "number_duplicates",
           "tracked_files", "detect_languages", "run_main", "LANGUAGES", "SEVERITIES"]


#: File suffix -> language, for the languages a repository holds.
LANGUAGES = {
    ".py": "python", ".pyw": "python",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".go": "go", ".java": "java",
    ".rb": "ruby", ".php": "php", ".cs": "csharp", ".kt": "kotlin", ".kts": "kotlin",
    ".scala": "scala", ".swift": "swift", ".rs": "rust", ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".m": "objective-c",
    ".sh": "shell", ".bash": "shell", ".pl": "perl", ".lua": "lua", ".ex": "elixir",
    ".exs": "elixir", ".erl": "erlang", ".dart": "dart", ".clj": "clojure",
}


class ScanError(Exception):
    """The scan cannot produce a trustworthy result; the message says why."""


def fingerprint(engine: str, rule_id: str, path: str, basis: str) -> str:
    """Identity of a finding across rescans: no line numbers, so shifted code keeps it."""
    return hashlib.sha256(f"{engine}|{rule_id}|{path}|{basis}".encode()).hexdigest()


def code_basis(root: str, path: str, start: int | None, end: int | None,
               cache: dict | None = None) -> str:
    """The flagged source lines with whitespace squeezed out, as a fingerprint basis."""
    if not start:
        return ""
    lines = None if cache is None else cache.get(path)
    if lines is None:
        try:
            if os.path.islink(os.path.join(root, path)):
                raise OSError("symbolic link")  # never read outside the checkout
            with open(os.path.join(root, path), encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except OSError:
            lines = []
        if cache is not None:
            cache[path] = lines
    text = "\n".join(lines[start - 1:(end or start)])
    return re.sub(r"\s+", "", text)


def number_duplicates(findings: list[dict]) -> list[dict]:
    """Identical code flagged twice by one rule in one file gets ``#2``, ``#3``... in order."""
    seen: Counter = Counter()
    for item in sorted(findings, key=lambda f: (f["path"], f.get("start_line") or 0, f["rule_id"])):
        seen[item["fingerprint"]] += 1
        if seen[item["fingerprint"]] > 1:
            item["fingerprint"] = hashlib.sha256(
                f"{item['fingerprint']}#{seen[item['fingerprint']]}".encode()).hexdigest()
    return findings


def make_finding(*, engine: str, rule_id: str, severity: str, path: str, message: str,
                 start_line: int | None = None, end_line: int | None = None,
                 confidence: str | None = None, cwe: str | None = None, basis: str = "",
                 **extra) -> dict:
    """One finding in the normalised shape every engine reports."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r} not one of {SEVERITIES}")
    item = {
        "rule_id": rule_id, "severity": severity, "confidence": confidence, "path": path,
        "start_line": start_line, "end_line": end_line if end_line is not None else start_line,
        "message": message[:10000], "engine": engine, "cwe": cwe,
        "fingerprint": fingerprint(engine, rule_id, path, basis),
    }
    item.update(extra)
    return item


def tracked_files(root: str) -> list[str]:
    """Paths git tracks under ``root`` (what the scan covers), relative, ``/``-separated."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return [p for p in out.stdout.decode("utf-8", "replace").split("\0") if p]


def detect_languages(files: list[str]) -> dict[str, int]:
    """Number of files per language, by suffix."""
    counts: Counter = Counter()
    for path in files:
        language = LANGUAGES.get(os.path.splitext(path)[1].lower())
        if language:
            counts[language] += 1
    return dict(sorted(counts.items()))


def run_main(name: str, scan: Callable[[argparse.Namespace], dict],
             configure: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse ``<repo> [options]``, run ``scan``, print its document or one error line."""
    parser = argparse.ArgumentParser(prog=f"python -m workers.scanners.{name}")
    parser.add_argument("repo", help="checked-out repository to scan")
    if configure:
        configure(parser)
    args = parser.parse_args()
    try:
        document = scan(args)
    except ScanError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        sys.exit(3)
    json.dump(document, sys.stdout)
