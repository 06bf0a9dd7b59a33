"""Per-job workspaces: a private directory, a shallow checkout, and scanner processes
that run with a minimal environment in their own process group, killed whole on timeout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["Workspace", "JobError", "JobTimeout", "run_process", "redact_url"]


class JobError(Exception):
    """A job cannot succeed; ``retry`` says whether another attempt may help."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


class JobTimeout(JobError):
    def __init__(self, message: str):
        super().__init__(message, retry=True)


def redact_url(url: str) -> str:
    """Hide credentials in a URL (``https://user:token@host`` -> ``https://***@host``)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)


def minimal_env(home: str) -> dict[str, str]:
    """Environment for git and scanners: never the agent's key or the broker URL."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ASKPASS": "/bin/true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def run_process(cmd: list[str], *, cwd: str, env: dict, deadline: float, what: str) -> str:
    """Run ``cmd`` in its own process group; kill the whole group at ``deadline``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JobTimeout(f"job timeout before {what}")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        out, err = proc.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise JobTimeout(f"job timeout during {what}") from None
    if proc.returncode != 0:
        last = (err or out or "").strip().splitlines()
        detail = last[-1] if last else f"exit status {proc.returncode}"
        raise JobError(f"{what} failed: {detail}")
    return out


class Workspace:
    """A job's private directory, removed when the job ends whatever happened."""

    def __init__(self, job_id: str, deadline: float, base_dir: str | None = None):
        self.job_id = job_id
        self.deadline = deadline
        self.root = Path(tempfile.mkdtemp(prefix=f"exploop-{job_id}-", dir=base_dir))
        self.repo = self.root / "repo"
        self.home = self.root / "home"
        self.home.mkdir()
        self.env = minimal_env(str(self.home))

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def git(self, *args: str, what: str) -> str:
        return run_process(["git", "-c", "protocol.file.allow=always", *args], cwd=str(self.repo),
                           env=self.env, deadline=self.deadline, what=what)

    def checkout(self, repo_url: str, ref: str) -> str:
        """Fetch ``ref`` (branch, tag or commit) with depth 1; return the commit id."""
        self.repo.mkdir()
        shown = redact_url(repo_url)
        self.git("init", "-q", what="git init")
        self.git("remote", "add", "origin", repo_url, what="git remote add")
        try:
            self.git("fetch", "-q", "--depth", "1", "--no-tags", "origin", ref,
                     what=f"clone of {shown}")
        except JobTimeout:
            raise
        except JobError as exc:
            text = str(exc)
            if "couldn't find remote ref" in text or "not our ref" in text:
                raise JobError(f"ref {ref!r} not found in {shown}") from None
            raise JobError(f"repository {shown} could not be cloned: {text.split(': ', 1)[-1]}") from None
        self.git("checkout", "-q", "--detach", "FETCH_HEAD", what="git checkout")
        return self.git("rev-parse", "HEAD", what="git rev-parse").strip()

    def run_scanner(self, module: str) -> dict:
        """Run ``python -m <module> <repo>`` and return its JSON document."""
        out = run_process([sys.executable, "-m", module, str(self.repo)], cwd=str(self.root),
                          env=dict(self.env, PYTHONPATH=_package_root()), deadline=self.deadline,
                          what=f"scanner {module.rsplit('.', 1)[-1]}")
        try:
            return json.loads(out)
        except ValueError:
            raise JobError(f"scanner {module} printed invalid output") from None


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
