"""Per-job workspaces: a private directory, a checkout (shallow unless history is needed),
and scanner processes that run with a minimal environment and a memory limit in their own
process group, killed whole when the job's time runs out.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exploop.config import format_size
from exploop.destinations import DestinationPolicy, DestinationRefused, repo_host
from exploop.redaction import redact_url

from .lifeline import die_with_parent
from .mirror import MirrorCache, MirrorLease, ls_tree_bytes

__all__ = ["Workspace", "JobError", "JobTimeout", "RepoTooLarge", "run_process", "minimal_env",
           "clone_error", "workspace_root", "sweep_workspaces"]

# What a process that hit RLIMIT_AS says on its way out (Python, glibc, OCaml/semgrep).
# Characters git never allows in a ref name (and whitespace/control characters).
_BAD_REF = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.")
_OUT_OF_MEMORY = re.compile(r"MemoryError|Cannot allocate memory|[Oo]ut of memory|"
                            r"engine was killed|std::bad_alloc")


class JobError(Exception):
    """A job cannot succeed; ``retry`` says whether another attempt may help."""

    def __init__(self, message: str, retry: bool = False, output: str = ""):
        super().__init__(message)
        self.retry = retry
        self.output = output  # what the process printed, for callers that explain it


class JobTimeout(JobError):
    def __init__(self, message: str):
        super().__init__(message, retry=True)


class RepoTooLarge(JobError):
    """The fetch passed REPO_SIZE_LIMIT and was stopped."""


def minimal_env(home: str, tmp: str | None = None) -> dict[str, str]:
    """Environment for git and scanners: never the agent's key or the broker URL."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ASKPASS": "/bin/true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if os.environ.get("GIT_SSL_CAINFO"):  # the operator's CA bundle for internal git hosts
        env["GIT_SSL_CAINFO"] = os.environ["GIT_SSL_CAINFO"]
    if tmp:
        env["TMPDIR"] = tmp  # scanners' temporary files stay inside the job's directory
    return env


def _prepare_child(memory_limit: int | None):
    """A ``preexec_fn``: the child dies with the process that started it (a scanner never
    outlives a killed agent), and its address space is capped (inherited by its children)."""
    parent = os.getpid()

    def apply() -> None:
        die_with_parent(parent)
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return apply


def workspace_root(agent_name: str) -> Path:
    """The directory holding this agent's job workspaces (one per agent name, so a start-up
    sweep never touches another agent's checkouts on the same host)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", agent_name)
    return Path(tempfile.gettempdir()) / f"exploop-work-{safe}"


def sweep_workspaces(root: Path) -> int:
    """Remove checkouts a previous run of this agent left behind (kill -9, power loss);
    return how many. Run at start, before any job."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = 0
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


#: How often a running process's ``check`` (is the job cancelled?) is called.
CHECK_INTERVAL = 5.0
#: How often the object store is measured while git fetches (REPO_SIZE_LIMIT).
FETCH_WATCH_INTERVAL = 0.2


def run_process(cmd: list[str], *, cwd: str, env: dict, deadline: float, what: str,
                memory_limit: int | None = None, check: Callable[[], None] | None = None,
                interval: float | None = None) -> str:
    """Run ``cmd`` in its own process group; kill the whole group at ``deadline``, or when
    ``check`` (called every ``interval`` seconds) raises, e.g. because the job was cancelled."""
    interval = interval or CHECK_INTERVAL
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JobTimeout(f"job timeout before {what}")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                            errors="replace", preexec_fn=_prepare_child(memory_limit))
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                out, err = proc.communicate(timeout=max(0.01, min(left, interval) if check else left))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    _kill_group(proc.pid)
                    proc.communicate()
                    raise JobTimeout(f"job timeout during {what}: time limit reached after "
                                     f"{remaining:.0f}s, process group killed") from None
                if check is not None:
                    check()  # raising here kills the group (finally) and ends the job
    finally:
        # Whatever happened, nothing the scanner started may outlive it.
        _kill_group(proc.pid)
    if proc.returncode != 0:
        text = (err or "").strip() or (out or "").strip()
        if memory_limit and _OUT_OF_MEMORY.search(text):
            raise JobError(f"{what} ran out of memory (SCANNER_MEMORY_LIMIT="
                           f"{format_size(memory_limit)})")
        if proc.returncode < 0:
            raise JobError(f"{what} was killed by {signal.Signals(-proc.returncode).name}")
        last = text.splitlines()
        detail = last[-1] if last else f"exit status {proc.returncode}"
        raise JobError(f"{what} failed: {detail}", output=text)
    return out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Workspace:
    """A job's private directory, removed when the job ends whatever happened."""

    def __init__(self, job_id: str, deadline: float, base_dir: str | None = None, *,
                 memory_limit: int | None = None, size_limit: int | None = None,
                 check: Callable[[], None] | None = None, mirrors: MirrorCache | None = None):
        self.job_id = job_id
        self.mirrors = mirrors  # None: fetch straight from the remote every time
        self.lease: MirrorLease | None = None
        self.check = check
        self.deadline = deadline
        self.memory_limit = memory_limit
        self.size_limit = size_limit
        self._pinned_options: list[str] = []  # set at checkout, from the destination check
        self._shown = ""  # the repository URL, credentials redacted
        self.root = Path(tempfile.mkdtemp(prefix=f"exploop-{job_id}-", dir=base_dir))
        self.repo = self.root / "repo"
        self.home = self.root / "home"
        self.tmp = self.root / "tmp"
        self.home.mkdir()
        self.tmp.mkdir()
        self.env = minimal_env(str(self.home), str(self.tmp))

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.lease is not None:  # only now: the checkout read the mirror's objects until here
            self.lease.release()

    def git(self, *args: str, what: str, check: Callable[[], None] | None = None,
            interval: float | None = None) -> str:
        return run_process(["git", "-c", "protocol.file.allow=always", *args], cwd=str(self.repo),
                           env=self.env, deadline=self.deadline, what=what, check=check or self.check,
                           interval=interval)

    def checkout(self, repo_url: str, ref: str, history: bool = False,
                 destinations: DestinationPolicy | None = None) -> str:
        """Fetch ``ref`` (branch, tag or commit) and check it out; return the commit id.

        With ``history`` every commit reachable from ``ref`` is fetched (secrets scans
        read them all); otherwise only the tip (``--depth 1``). The repository's host is
        checked against the destination policy right before the fetch, and git is pinned
        to the addresses checked.
        """
        shown = redact_url(repo_url)
        # Both come from the tenant: one starting with "-" would be read as an option
        # (``--upload-pack=<command>`` runs a command), so refuse it and end options with "--".
        if not ref or ref.startswith("-") or _BAD_REF.search(ref):
            raise JobError(f"invalid ref {ref!r}: expected a branch, tag or commit")
        if repo_url.startswith("-"):
            raise JobError(f"invalid repository URL {shown!r}")
        self.repo.mkdir()
        # Checked right before the fetch (DNS answers may have changed since the submit), and
        # git pinned to the addresses checked: no second lookup, no redirect elsewhere.
        self._pinned_options = _pinned(repo_url, destinations or DestinationPolicy())
        self._shown = shown
        target = "FETCH_HEAD"
        try:
            if self.mirrors is not None:  # the workspace's .git is written by the mirror (symlinks off)
                target = self._fetch_through_mirror(repo_url, ref, history)
            else:
                self.git("init", "-q", what="git init")
                # Check symlinks out as plain files holding their target: a tenant's link to
                # /etc/passwd or to the agent's key file must never be followed by a scanner.
                self.git("config", "core.symlinks", "false", what="git config")
                self.git("remote", "add", "--", "origin", repo_url, what="git remote add")
                depth = [] if history else ["--depth", "1"]
                self.git(*self._pinned_options, "fetch", "-q", *depth, "--no-tags", "--", "origin", ref,
                         what=f"clone of {shown}", check=self._watch_fetch(shown, self.repo / ".git" / "objects"),
                         interval=FETCH_WATCH_INTERVAL)
        except (JobTimeout, RepoTooLarge):
            raise
        except JobError as exc:
            raise clone_error(exc.output or str(exc), shown, ref) from None
        if self.size_limit:
            self._check_size(shown, target)
        if self.lease is not None:
            if not self.lease.attach(self.repo, target):  # not a tree the cache already holds
                self.git("checkout", "-q", "--detach", target, what="git checkout")
                self.lease.remember_tree(self.repo, target)
            return self.lease.head(self.repo)
        self.git("checkout", "-q", "--detach", target, what="git checkout")
        return self.git("rev-parse", "HEAD", what="git rev-parse").strip()

    def _mirror_git(self, git_dir: Path, *args: str, what: str) -> str:
        """git on the repository's cached mirror; a fetch is pinned and watched like a plain one."""
        fetching = "fetch" in args[:1]
        options = self._pinned_options if fetching else []
        return run_process(["git", *options, "-c", "protocol.file.allow=always", "--git-dir", str(git_dir), *args],
                           cwd=str(self.root), env=self.env, deadline=self.deadline, what=what,
                           check=self._watch_fetch(self._shown, git_dir / "objects") if fetching else self.check,
                           interval=FETCH_WATCH_INTERVAL if fetching else None)

    def _fetch_through_mirror(self, repo_url: str, ref: str, history: bool) -> str:
        """Fetch into the repository's cached mirror, then borrow its objects; the fetched object."""
        assert self.mirrors is not None
        try:
            self.lease = self.mirrors.lease(repo_url, self.deadline)
            fetched = self.lease.fetch(self._mirror_git, repo_url, ref, history, self.deadline)
        except BlockingIOError:
            raise JobTimeout("job timeout waiting for another job's fetch of the same repository") from None
        return fetched

    def _watch_fetch(self, shown: str, objects: Path) -> Callable[[], None]:
        """While git fetches: stop it as soon as the object store (``objects``: the checkout's,
        or the mirror's, which holds the whole repository) passes REPO_SIZE_LIMIT, and still
        ask every CHECK_INTERVAL whether the job is wanted."""
        asked = [time.monotonic()]

        def watch() -> None:
            if self.size_limit:
                size = _tree_bytes(objects)
                if size > self.size_limit:
                    raise RepoTooLarge(f"repository {shown} is too large: the fetch passed REPO_SIZE_LIMIT"
                                       f" ({format_size(self.size_limit)}) and was stopped")
            if self.check and time.monotonic() - asked[0] >= CHECK_INTERVAL:
                asked[0] = time.monotonic()
                self.check()
        return watch

    def _check_size(self, shown: str, target: str = "FETCH_HEAD") -> None:
        """Refuse a repository whose history or tree is over the limit, before checkout."""
        assert self.size_limit is not None  # called only with a limit set
        if self.lease is not None:
            packed = self.lease.object_bytes()
            tree = self.lease.tree_bytes(self._mirror_git, target)
        else:
            stats = dict(line.split(": ", 1) for line in
                         self.git("count-objects", "-v", what="git count-objects").splitlines() if ": " in line)
            packed = (int(stats.get("size-pack", 0)) + int(stats.get("size", 0))) * 1024
            tree = ls_tree_bytes(self.git("ls-tree", "-r", "-l", "--full-tree", target, what="git ls-tree"))
        for what, size in (("fetched objects", packed), ("checked-out tree", tree)):
            if size > self.size_limit:
                raise JobError(f"repository {shown} is too large: {what} {format_size(size)} exceed "
                               f"REPO_SIZE_LIMIT ({format_size(self.size_limit)})")

    def run_scanner(self, module: str, *args: str) -> dict:
        """Run ``python -m <module> <repo> [args]`` and return its JSON document."""
        name = module.rsplit(".", 1)[-1]
        out = run_process([sys.executable, "-m", module, str(self.repo), *args], cwd=str(self.root),
                          env=dict(self.env, PYTHONPATH=_package_root()), deadline=self.deadline,
                          what=f"scanner {name}", memory_limit=self.memory_limit, check=self.check)
        try:
            return json.loads(out)
        except ValueError:
            raise JobError(f"scanner {name} printed invalid output") from None


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (git's temporary pack files included)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # git renamed or removed it meanwhile
                pass
    return total


def _pinned(repo_url: str, policy: DestinationPolicy) -> list[str]:
    """git options that keep the fetch on the addresses the policy allowed (no redirects,
    no second DNS lookup); raises JobError naming the policy when the host is refused."""
    try:
        target = repo_host(repo_url)
        if target is None:
            return []  # a local path: the API accepts those only where ALLOW_LOCAL_REPOS is set
        host, port = target
        addresses = policy.check(host, port)
    except DestinationRefused as exc:
        raise JobError(str(exc)) from None
    options = ["-c", "http.followRedirects=false"]
    if host != str(addresses[0]):
        listed = ",".join(f"[{a}]" if a.version == 6 else str(a) for a in addresses)
        options += ["-c", f"http.curloptResolve={host}:{port}:{listed}"]
        if "://" not in repo_url or repo_url.startswith("ssh://"):
            options += ["-c", f"core.sshCommand=ssh -o HostName={addresses[0]} -o HostKeyAlias={host}"]
    return options


#: git's words for the usual reasons a fetch fails, and the sentence a tenant gets instead.
_CLONE_ERRORS = (
    (re.compile(r"Authentication failed|could not read (Username|Password)|returned error: 40[13]"
                r"|Permission denied \(publickey"),
     "repository {shown} needs credentials, or the ones given were refused", False),
    (re.compile(r"repository '.*' not found|returned error: 404|does not appear to be a git repository"),
     "repository {shown} was not found (or the credentials given cannot see it)", False),
    (re.compile(r"returned error: 30[0-9]"),
     "repository {shown} redirects elsewhere and redirects are not followed: give its final URL", False),
    (re.compile(r"SSL certificate|certificate verify|server certificate|Host key verification failed"),
     "the identity of the repository host of {shown} could not be verified (TLS certificate or SSH"
     " host key)", False),
    (re.compile(r"returned error: 5\d\d|Could not resolve|Failed to connect|Connection (refused|reset|timed out)"
                r"|timed out|Could not read from remote repository|early EOF|unexpected disconnect"),
     "the repository host of {shown} could not be reached or failed while sending it; the job will be"
     " retried", True),
)


def clone_error(output: str, shown: str, ref: str) -> JobError:
    """One sentence saying why a fetch failed (git's own words only when they fit no known case)."""
    if "couldn't find remote ref" in output or "not our ref" in output:
        return JobError(f"ref {ref!r} not found in {shown}")
    for pattern, sentence, retry in _CLONE_ERRORS:
        if pattern.search(output):
            return JobError(sentence.format(shown=shown), retry=retry)
    lines = [line.removeprefix("fatal: ").removeprefix("error: ").strip() for line in output.splitlines()]
    said = redact_url(next((line for line in reversed(lines) if line), "no message"))
    return JobError(f"repository {shown} could not be cloned; git said: {said}")


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
