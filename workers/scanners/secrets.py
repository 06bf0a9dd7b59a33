"""Secrets scan of a checked-out repository: the working tree and every commit reachable
from the checked-out ref, with detect-secrets (offline: verification off), plus gitleaks
when a ``gitleaks`` binary is on PATH.

Run as ``python -m workers.scanners.secrets <dir>`` by the agent, so the scan has its own
process (time limit, memory limit, minimal environment). Secret values never leave this
process: a finding carries a SHA-256 of the value and a masked preview.

History is read blob by blob: every (path, blob) pair that some commit introduced and
that differs from the checked-out tree is scanned once, and a secret found there is
reported with the first commit that introduced it, unless the same secret is still in
the same file of the working tree (then the working-tree finding stands for both).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING, Any

from .common import ScanError, make_finding, number_duplicates, run_main

if TYPE_CHECKING:
    from detect_secrets.core.potential_secret import PotentialSecret

__all__ = ["scan", "ENGINE", "mask"]

ENGINE = "detect-secrets"

# Provider keys are high; private keys critical; heuristics lower.
_SEVERITY = {
    "Private Key": "critical",
    "Secret Keyword": "medium",
    "Base64 High Entropy String": "low",
    "Hex High Entropy String": "low",
}
_CONFIDENCE = {"Secret Keyword": "medium", "Base64 High Entropy String": "low",
               "Hex High Entropy String": "low"}
# Blobs larger than this are not secrets files (detect-secrets would crawl them for minutes).
_MAX_BLOB = 2 * 1024 * 1024


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def mask(value: str) -> str:
    """A preview that never shows more than a quarter of the value (at most 4 characters)."""
    keep = min(4, len(value) // 4)
    return value[:keep] + "*" * max(4, min(len(value) - keep, 40))


def _secret_finding(engine: str, rule: str, path: str, line: int | None, value: str,
                    severity: str, confidence: str, commit: str | None, message: str) -> dict:
    secret_hash = hashlib.sha256(value.encode()).hexdigest()  # keyed per tenant by the API (core.vault)
    extra: dict[str, Any] = {"secret_hash": secret_hash, "preview": mask(value)}
    if commit:
        extra["commit"] = commit
    return make_finding(engine=engine, rule_id=rule, severity=severity, path=path, message=message,
                        start_line=line, confidence=confidence, cwe="CWE-798", basis=secret_hash, **extra)


def _git(root: str, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise ScanError(f"git {args[0]} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return proc.stdout


def _detect(paths: list[str], root: str, processes: int) -> list[tuple[str, PotentialSecret]]:
    """detect-secrets over ``paths`` (relative to ``root``); (path, PotentialSecret) pairs."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    previous = os.getcwd()
    os.chdir(root)  # detect-secrets reports paths relative to the working directory
    try:
        with default_settings():
            collection = SecretsCollection(root=root)
            if paths:
                collection.scan_files(*paths, num_processors=processes)
    finally:
        os.chdir(previous)
    return [(os.path.normpath(path).replace(os.sep, "/"), secret) for path, secret in collection]


def scan_tree(root: str, processes: int = 1) -> list[dict]:
    """The git-tracked files of the working tree."""
    from detect_secrets.core.baseline import get_files_to_scan

    previous = os.getcwd()
    os.chdir(root)
    try:
        files = list(get_files_to_scan(".", should_scan_all_files=False, root=root))
    finally:
        os.chdir(previous)
    findings = []
    for path, secret in _detect(files, root, processes):
        rule = f"secrets.{_slug(secret.type)}"
        findings.append(_secret_finding(
            ENGINE, rule, path, secret.line_number, secret.secret_value or "",
            _SEVERITY.get(secret.type, "high"), _CONFIDENCE.get(secret.type, "high"), None,
            f"{secret.type} committed to the repository"))
    return findings


def _history_blobs(root: str) -> list[tuple[str, str, str]]:
    """(path, blob, first commit) for every blob some commit added or changed, oldest first."""
    # -z output: "commit <sha>", then per change "\n:<modes> <old> <new> <status>" and "<path>".
    out = _git(root, "log", "--reverse", "--raw", "--no-abbrev", "--no-renames", "--root",
               "--diff-merges=separate", "--format=commit %H", "-z", "HEAD")
    first: dict[tuple[str, str], str] = {}
    tokens = out.split("\0")
    commit = ""
    i = 0
    while i < len(tokens):
        token = tokens[i].lstrip("\n")
        i += 1
        if token.startswith("commit "):
            commit = token.split()[1]
        elif token.startswith(":") and i < len(tokens):
            meta, path = token[1:].split(), tokens[i]
            i += 1
            if len(meta) >= 5 and meta[4][:1] in ("A", "M", "T") and meta[3].strip("0"):
                first.setdefault((path, meta[3]), commit)
    return [(path, blob, sha) for (path, blob), sha in first.items()]


def scan_history(root: str, tree_findings: list[dict], processes: int = 1) -> list[dict]:
    """Secrets in blobs of past commits that are not in the working tree."""
    current = set()
    for line in _git(root, "ls-tree", "-r", "-z", "--full-tree", "HEAD").split("\0"):
        if "\t" in line:
            meta, path = line.split("\t", 1)
            current.add((path, meta.split()[2]))
    blobs = _history_blobs(root)
    old = [(path, blob, commit) for path, blob, commit in blobs if (path, blob) not in current]
    if not old:
        return []
    order = {}
    staging = tempfile.mkdtemp(prefix="history-")
    try:
        mapping: dict[str, tuple[str, str]] = {}
        with subprocess.Popen(["git", "cat-file", "--batch"], cwd=root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) as cat:
            assert cat.stdin is not None and cat.stdout is not None  # both are pipes
            for n, (path, blob, commit) in enumerate(old):
                cat.stdin.write(f"{blob}\n".encode())
                cat.stdin.flush()
                header = cat.stdout.readline().split()
                if len(header) < 3 or header[1] != b"blob":
                    continue
                data = cat.stdout.read(int(header[2]))
                cat.stdout.read(1)  # the newline after the content
                if len(data) > _MAX_BLOB or b"\0" in data[:8000]:
                    continue
                # Keep the original name (detect-secrets filters by name and suffix).
                staged = os.path.join(str(n), path)
                target = os.path.join(staging, staged)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as handle:
                    handle.write(data)
                mapping[os.path.normpath(staged).replace(os.sep, "/")] = (path, commit)
                order[(path, commit)] = n
            cat.stdin.close()
        found = _detect(sorted(mapping), staging, processes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    in_tree = {(f["rule_id"], f["path"], f["secret_hash"]) for f in tree_findings}
    best: dict[tuple, dict] = {}
    for staged, secret in found:
        path, commit = mapping[staged]
        rule = f"secrets.{_slug(secret.type)}"
        value = secret.secret_value or ""
        item = _secret_finding(
            ENGINE, rule, path, secret.line_number, value,
            _SEVERITY.get(secret.type, "high"), _CONFIDENCE.get(secret.type, "high"), commit,
            f"{secret.type} in git history (added in commit {commit[:12]}; "
            "no longer in the checked-out tree): rotate it, removing the file does not revoke it")
        key = (rule, path, item["secret_hash"])
        if key in in_tree:
            continue
        if key not in best or order[(path, commit)] < order[(best[key]["path"], best[key]["commit"])]:
            best[key] = item
    return list(best.values())


def scan_gitleaks(root: str, gitleaks: str, known: set) -> tuple[list[dict], dict]:
    """gitleaks over the whole history (``detect``); findings not already reported."""
    version = subprocess.run([gitleaks, "version"], capture_output=True, text=True).stdout.strip()
    report = os.path.join(tempfile.mkdtemp(prefix="gitleaks-"), "report.json")
    try:
        proc = subprocess.run([gitleaks, "detect", "--source", root, "--report-format", "json",
                               "--report-path", report, "--no-banner", "--exit-code", "0",
                               "--log-level", "error"], capture_output=True, text=True,
                              errors="replace")
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise ScanError(f"gitleaks exited with status {proc.returncode}: "
                            f"{lines[-1] if lines else 'no output'}")
        with open(report) as handle:
            leaks = json.load(handle) or []
    finally:
        shutil.rmtree(os.path.dirname(report), ignore_errors=True)
    findings = []
    for leak in leaks:
        value = leak.get("Secret") or leak.get("Match") or ""
        rule = f"gitleaks.{leak.get('RuleID', 'unknown')}"
        item = _secret_finding(
            "gitleaks", rule, leak.get("File", ""),
            leak.get("StartLine") or None, value, "high", "medium", leak.get("Commit") or None,
            f"{leak.get('Description') or leak.get('RuleID')} found by gitleaks"
            + (f" in commit {leak['Commit'][:12]}" if leak.get("Commit") else ""))
        if (item["path"], item["secret_hash"]) in known:
            continue  # detect-secrets already reported this value in this file
        known.add((item["path"], item["secret_hash"]))
        findings.append(item)
    return findings, {"name": "gitleaks", "version": version.lstrip("v") or "unknown"}


def scan(root: str, history: bool = True) -> dict:
    """Scan the working tree (and history) of ``root``; return engines, findings, summary."""
    from detect_secrets.__version__ import VERSION

    root = os.path.abspath(root)
    processes = max(1, min(4, os.cpu_count() or 1))
    findings = scan_tree(root, processes)
    summary: dict = {"history": history}
    if history:
        if _git(root, "rev-parse", "--is-shallow-repository").strip() == "true":
            raise ScanError("history scan needs a full clone, but the checkout is shallow")
        past = scan_history(root, findings, processes)
        findings += past
        summary["commits_scanned"] = int(_git(root, "rev-list", "--count", "HEAD").strip())
        summary["history_findings"] = len(past)
    engines = [{"name": ENGINE, "version": VERSION}]
    gitleaks = shutil.which("gitleaks")
    if gitleaks:
        known = {(f["path"], f["secret_hash"]) for f in findings}
        extra, info = scan_gitleaks(root, gitleaks, known)
        findings += extra
        engines.append(info)
    else:
        summary["engines_unavailable"] = [{"name": "gitleaks", "reason": "no gitleaks binary on PATH"}]
    number_duplicates(findings)  # one value twice in one file: two findings, two fingerprints
    findings.sort(key=lambda f: (f["path"], f["start_line"] or 0, f["rule_id"], f.get("commit") or ""))
    return {"engines": engines, "findings": findings, "summary": summary}


def _configure(parser) -> None:
    parser.add_argument("--no-history", action="store_true", help="scan the working tree only")


if __name__ == "__main__":
    run_main("secrets", lambda args: scan(args.repo, history=not args.no_history), _configure)
