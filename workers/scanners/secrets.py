"""Secrets scan of a checked-out repository with detect-secrets (offline: no verification).

Run as ``python -m workers.scanners.secrets <dir>`` by the agent, so the scan has
its own process (time limit, memory limit, minimal environment); prints one
JSON document ``{"engine": ..., "version": ..., "findings": [...]}``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

__all__ = ["scan", "ENGINE"]

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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _mask(value: str) -> str:
    keep = min(4, len(value) // 4)
    return value[:keep] + "*" * max(4, min(len(value) - keep, 40))


def scan(root: str) -> dict:
    """Scan the git-tracked files under ``root``; return engine info and findings."""
    from detect_secrets import SecretsCollection
    from detect_secrets.__version__ import VERSION
    from detect_secrets.core.baseline import get_files_to_scan
    from detect_secrets.settings import default_settings

    root = os.path.abspath(root)
    previous = os.getcwd()
    os.chdir(root)  # detect-secrets reports paths relative to the working directory
    try:
        with default_settings():
            collection = SecretsCollection(root=root)
            files = list(get_files_to_scan(".", should_scan_all_files=False, root=root))
            collection.scan_files(*files, num_processors=1)
    finally:
        os.chdir(previous)
    findings = []
    for path, secret in collection:
        value = secret.secret_value or ""
        secret_hash = hashlib.sha256(value.encode()).hexdigest()
        rule = f"secrets.{_slug(secret.type)}"
        rel = os.path.normpath(path).replace(os.sep, "/")
        findings.append({
            "rule_id": rule,
            "severity": _SEVERITY.get(secret.type, "high"),
            "confidence": _CONFIDENCE.get(secret.type, "high"),
            "path": rel,
            "start_line": secret.line_number,
            "end_line": secret.line_number,
            "message": f"{secret.type} committed to the repository",
            "engine": ENGINE,
            "cwe": "CWE-798",
            "fingerprint": hashlib.sha256(f"{ENGINE}|{rule}|{rel}|{secret_hash}".encode()).hexdigest(),
            "secret_hash": secret_hash,
            "preview": _mask(value),
        })
    findings.sort(key=lambda f: (f["path"], f["start_line"] or 0, f["rule_id"]))
    return {"engine": ENGINE, "version": VERSION, "findings": findings}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m workers.scanners.secrets <directory>")
    json.dump(scan(sys.argv[1]), sys.stdout)
