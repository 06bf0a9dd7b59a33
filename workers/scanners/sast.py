"""Static analysis of a checked-out repository: bandit for Python, semgrep with the rule
set shipped in ``workers/scanners/rules`` for Python, JavaScript/TypeScript, Go and Java.

Run as ``python -m workers.scanners.sast <dir> [--semgrep PATH|none]``. semgrep is an
optional extra (``exploop[semgrep]``): without it the job still runs bandit and the
summary lists the languages no engine covered. Both engines run offline: semgrep with
``--metrics=off --disable-version-check`` and local rules only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .common import ScanError, code_basis, detect_languages, make_finding, number_duplicates, run_main, tracked_files

__all__ = ["scan", "find_semgrep", "RULES_DIR", "SEMGREP_LANGUAGES"]

RULES_DIR = Path(__file__).resolve().parent / "rules"
#: Languages the shipped semgrep rules cover (bandit covers Python).
SEMGREP_LANGUAGES = ("python", "javascript", "typescript", "go", "java")

_BANDIT_LEVEL = {"HIGH": "high", "MEDIUM": "medium", "LOW": "low", "UNDEFINED": "info"}
_SEMGREP_LEVEL = {"ERROR": "high", "WARNING": "medium", "INFO": "low"}
# bandit's B101 flags every ``assert``: noise for a security report.
_BANDIT_SKIP = "B101"
# Keep each bandit command line well under the kernel's argument limits.
_ARGV_BUDGET = 100_000


def find_semgrep(setting: str | None) -> str | None:
    """The semgrep executable: SEMGREP_BIN, beside this Python, or on PATH ("none": off)."""
    if setting:
        if setting.lower() == "none":
            return None
        if not (os.path.isfile(setting) and os.access(setting, os.X_OK)):
            raise ScanError(f"SEMGREP_BIN={setting} is not an executable file")
        return setting
    beside = Path(sys.executable).parent / "semgrep"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("semgrep")


def _run(cmd: list[str], cwd: str, engine: str, ok_codes=(0,)) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    except OSError as exc:
        raise ScanError(f"{engine} could not start: {exc}") from None
    if proc.returncode not in ok_codes:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ScanError(f"{engine} exited with status {proc.returncode}: "
                        f"{lines[-1] if lines else 'no output'}")
    return proc


def _bandit_version() -> str:
    from importlib.metadata import version  # importing bandit itself loads every plugin
    return version("bandit")


def run_bandit(root: str, files: list[str], cache: dict) -> tuple[list[dict], dict]:
    """bandit on the tracked Python files; its JSON report mapped onto findings."""
    targets = [f for f in files if f.endswith((".py", ".pyw"))
               and not os.path.islink(os.path.join(root, f))]  # never read outside the checkout
    findings: list[dict] = []
    errors: list[dict] = []
    skipped = 0
    batch: list[str] = []
    batches = []
    for path in targets:
        if batch and sum(len(p) + 1 for p in batch) + len(path) > _ARGV_BUDGET:
            batches.append(batch)
            batch = []
        batch.append(path)
    if batch:
        batches.append(batch)
    for batch in batches:
        # Exit 1 means "issues found"; anything else is a failure of bandit itself.
        proc = _run([sys.executable, "-m", "bandit", "-f", "json", "-q", "-s", _BANDIT_SKIP,
                     "--", *batch], root, "bandit", ok_codes=(0, 1))
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            raise ScanError("bandit printed invalid JSON") from None
        errors.extend({"path": _rel(e.get("filename", "")), "reason": e.get("reason", "")}
                      for e in report.get("errors", []))
        skipped += int(report.get("metrics", {}).get("_totals", {}).get("nosec", 0))
        for issue in report.get("results", []):
            path = _rel(issue["filename"])
            # The engine's own line (where bandit points, e.g. ``shell=True`` inside a call
            # spread over lines); the whole range is the end line and the fingerprint basis.
            lines = issue.get("line_range") or [issue["line_number"]]
            first, last = min(lines), max(lines)
            line = issue.get("line_number") or first
            cwe = issue.get("issue_cwe") or {}
            rule = f"bandit.{issue['test_id']}"
            findings.append(make_finding(
                engine="bandit", rule_id=rule, path=path, start_line=line, end_line=max(last, line),
                severity=_BANDIT_LEVEL.get(issue["issue_severity"], "medium"),
                confidence=_BANDIT_LEVEL.get(issue["issue_confidence"], "medium"),
                cwe=f"CWE-{cwe['id']}" if cwe.get("id") else None,
                message=f"{issue['test_id']} {issue['test_name']}: {issue['issue_text']}",
                basis=code_basis(root, path, first, last, cache)))
    return findings, {"name": "bandit", "version": _bandit_version(), "languages": ["python"],
                      "files": len(targets), "errors": errors[:50], "error_count": len(errors),
                      "suppressed": skipped}


def _rule_ids() -> dict[str, dict]:
    import yaml
    rules = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        for rule in yaml.safe_load(path.read_text())["rules"]:
            rules[rule["id"]] = rule
    return rules


def run_semgrep(root: str, semgrep: str, cache: dict) -> tuple[list[dict], dict]:
    """semgrep with the shipped rules, offline; its JSON report mapped onto findings."""
    rules = _rule_ids()
    cmd = [semgrep, "scan", "--config", str(RULES_DIR), "--json", "--quiet", "--metrics=off",
           "--disable-version-check", "--no-rewrite-rule-ids", "--timeout", "30", "."]
    env = dict(os.environ, SEMGREP_SEND_METRICS="off", SEMGREP_ENABLE_VERSION_CHECK="0")
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, errors="replace", env=env)
    except OSError as exc:
        raise ScanError(f"semgrep could not start: {exc}") from None
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        lines = proc.stderr.strip().splitlines()
        raise ScanError(f"semgrep exited with status {proc.returncode}: "
                        f"{lines[-1] if lines else 'no output'}") from None
    fatal = [e for e in report.get("errors", []) if e.get("level") == "error" and not e.get("path")]
    if fatal or proc.returncode not in (0, 1):
        message = fatal[0].get("message", "") if fatal else proc.stderr.strip()
        message = " ".join(message.split())
        if "engine was killed" in message or "memory" in message.lower():
            raise ScanError(f"semgrep ran out of memory: {message[:300]}")
        raise ScanError(f"semgrep failed (status {proc.returncode}): {message[:300]}")
    findings = []
    for result in report.get("results", []):
        rule_id = result["check_id"].rsplit(".", 1)[-1]
        rule = rules.get(rule_id, {})
        meta = rule.get("metadata", {})
        path = _rel(result["path"])
        start, end = result["start"]["line"], result["end"]["line"]
        findings.append(make_finding(
            engine="semgrep", rule_id=f"semgrep.{rule_id}", path=path, start_line=start,
            end_line=end,
            severity=meta.get("exploop-severity") or _SEMGREP_LEVEL.get(result["extra"]["severity"], "medium"),
            confidence=meta.get("confidence"), cwe=meta.get("cwe"),
            message=" ".join(result["extra"]["message"].split()),
            basis=code_basis(root, path, start, end, cache)))
    skipped = sorted({_rel(e["path"]) for e in report.get("errors", []) if e.get("path")})
    return findings, {"name": "semgrep", "version": report.get("version", "unknown"),
                      "languages": list(SEMGREP_LANGUAGES), "rules": len(rules),
                      "files": len(report.get("paths", {}).get("scanned", [])),
                      "errors": [{"path": p, "reason": "could not be analysed"} for p in skipped[:50]],
                      "error_count": len(skipped)}


def _rel(path: str) -> str:
    return os.path.normpath(path).replace(os.sep, "/").removeprefix("./")


def scan(root: str, semgrep_setting: str | None = None) -> dict:
    """Run every available engine over ``root``; return engines, findings and coverage."""
    root = os.path.abspath(root)
    files = tracked_files(root)
    languages = detect_languages(files)
    cache: dict = {}
    engines, findings, unavailable = [], [], []
    if "python" in languages:
        found, info = run_bandit(root, files, cache)
        findings += found
        engines.append(info)
    semgrep = find_semgrep(semgrep_setting)
    if semgrep is None:
        unavailable.append({"name": "semgrep", "reason": "disabled by SEMGREP_BIN=none"
                            if (semgrep_setting or "").lower() == "none"
                            else "not installed (pip install 'exploop[semgrep]')"})
    elif set(languages) & set(SEMGREP_LANGUAGES):
        found, info = run_semgrep(root, semgrep, cache)
        findings += found
        engines.append(info)
    covered = {lang for engine in engines for lang in engine["languages"]}
    number_duplicates(findings)
    findings.sort(key=lambda f: (f["path"], f["start_line"] or 0, f["rule_id"]))
    return {
        "engines": [{"name": e["name"], "version": e["version"]} for e in engines],
        "findings": findings,
        "summary": {
            "languages": languages,
            "languages_without_engine": sorted(set(languages) - covered),
            "engines_unavailable": unavailable,
            "coverage": [{k: v for k, v in e.items() if k != "version"} for e in engines],
        },
    }


def _configure(parser) -> None:
    parser.add_argument("--semgrep", default=None,
                        help="semgrep executable (default: beside this Python, then PATH; 'none' disables)")


if __name__ == "__main__":
    run_main("sast", lambda args: scan(args.repo, args.semgrep), _configure)
