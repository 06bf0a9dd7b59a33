"""A cache of bare mirrors, one per repository URL, on the agent's disk.

A job fetches its ref into the repository's mirror (a rescan transfers only objects the
mirror lacks) and checks out from it through git's alternates, without copying objects.
The last two checked-out trees of each mirror are kept beside it, read-only, and a job of
one of those commits gets its working tree as hard links (no checkout: writing the files
is most of a checkout's time). The cache is bounded by size: least recently used mirrors
are removed first, never one that a running job uses.

Concurrency, with ``flock`` on two files per mirror:

* ``<key>.use``: held shared by every job reading the mirror, from before it looks at the
  directory until its workspace is removed; eviction needs it exclusive (non-blocking),
  so a mirror in use is never removed.
* ``<key>.fetch``: held exclusive while one job creates or fetches into the mirror, so
  two jobs of one repository never write it at once. Fetches only add objects and
  ``gc`` is off in mirrors, so readers are never disturbed by a fetch.

The mirror is keyed by the whole URL, credentials included, and every job still fetches
from the repository with its own URL: the remote decides access each time, a mirror is
never a way around it. No URL is stored in a mirror.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["MirrorCache", "MirrorLease", "GitRunner"]

#: ``run(git_dir, *args, what=...) -> stdout``: git with the job's environment and deadline.
GitRunner = Callable[..., str]

#: Settings written into every mirror: no gc or maintenance (they could delete objects a
#: running job reads through alternates), no hooks, no credentials.
_MIRROR_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tbare = true\n[gc]\n\tauto = 0\n" \
                 "[maintenance]\n\tauto = false\n[fetch]\n\twriteCommitGraph = false\n"
#: A workspace's repository. Symbolic links are checked out as plain files holding their
#: target: a tenant's link to /etc/passwd or to the agent's key must never be followed.
_WORKSPACE_CONFIG = "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n" \
                    "\tlogallrefupdates = false\n\tsymlinks = false\n[gc]\n\tauto = 0\n"


def _lock(path: Path, mode: int, deadline: float | None) -> int:
    """An open, locked file descriptor; None-deadline and LOCK_NB: raise BlockingIOError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` into the existing directory ``target`` (``cp -al``)."""
    for folder, _, files in os.walk(source):
        rel = os.path.relpath(folder, source)
        into = target if rel == "." else target / rel
        if rel != ".":
            into.mkdir()
        for name in files:
            os.link(os.path.join(folder, name), into / name, follow_symlinks=False)


def ls_tree_bytes(listing: str) -> int:
    """Total file size in the output of ``git ls-tree -r -l``."""
    total = 0
    for line in listing.splitlines():
        fields = line.split("\t", 1)[0].split()  # mode type object size<TAB>path
        if len(fields) == 4 and fields[3].isdigit():
            total += int(fields[3])
    return total


def _size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                pass
    return total


class MirrorLease:
    """One job's use of one mirror: fetch into it, attach a workspace, release at the end."""

    def __init__(self, cache: MirrorCache, key: str, use_fd: int):
        self.cache, self.key, self._use_fd = cache, key, use_fd
        self.path = cache.root / f"{key}.git"
        self.deadline = time.monotonic() + 600  # the job's, once it fetches

    def fetch(self, run: GitRunner, url: str, ref: str, history: bool, deadline: float) -> str:
        """Fetch ``ref`` from ``url`` into the mirror; return the commit it names."""
        self.deadline = deadline
        fetch_fd = _lock(self.cache.root / f"{self.key}.fetch", fcntl.LOCK_EX, deadline)
        try:
            if not (self.path / "objects").is_dir():
                self._create()
            shallow = (self.path / "shallow").exists()
            depth = (["--unshallow"] if shallow else []) if history else (["--depth", "1"] if shallow or
                                                                          self._empty() else [])
            # A ref of our own keeps the tip reachable, so the next fetch negotiates from it.
            local = "refs/exploop/" + hashlib.sha256(ref.encode()).hexdigest()[:16]
            run(self.path, "fetch", "-q", *depth, "--no-tags", "--no-write-fetch-head", "--", url,
                f"+{ref}:{local}", what="clone")
            try:  # the ref file itself (gc, which would pack it, is off): one process fewer
                fetched = (self.path / local).read_text().strip()
            except FileNotFoundError:
                fetched = run(self.path, "rev-parse", "--verify", "-q", local, what="git rev-parse").strip()
        finally:
            _unlock(fetch_fd)
        os.utime(self.cache.root / f"{self.key}.use")  # most recently used
        return fetched  # a commit, or an annotated tag (checkout peels it)

    def object_bytes(self) -> int:
        """Disk size of the mirror's objects: every fetched object, whatever the ref."""
        return _size(self.path / "objects")

    def tree_bytes(self, run: GitRunner, treeish: str) -> int:
        """Total size of the files ``treeish`` checks out, remembered per object id."""
        memo = self.path / "exploop-tree-sizes" / treeish
        try:
            return int(memo.read_text())
        except (FileNotFoundError, ValueError):
            pass
        total = ls_tree_bytes(run(self.path, "ls-tree", "-r", "-l", "--full-tree", treeish, what="git ls-tree"))
        memo.parent.mkdir(exist_ok=True)
        staged = memo.with_name(f".{treeish}.{os.getpid()}")
        staged.write_text(str(total))
        os.replace(staged, memo)
        return total

    @staticmethod
    def head(repo: Path) -> str:
        """The commit a detached checkout of ``repo`` is at (read, not a git process)."""
        return (repo / ".git" / "HEAD").read_text().strip()

    def _empty(self) -> bool:
        """Nothing fetched yet (every fetch leaves a ref under refs/exploop)."""
        refs = self.path / "refs" / "exploop"
        return not refs.is_dir() or not any(refs.iterdir())

    def _create(self) -> None:
        """A bare repository written directly (no ``git init`` process), renamed into place."""
        staging = self.cache.root / f".new-{self.key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
            (staging / sub).mkdir(parents=True)
        (staging / "HEAD").write_text("ref: refs/heads/main\n")
        (staging / "config").write_text(_MIRROR_CONFIG)
        shutil.rmtree(self.path, ignore_errors=True)  # a leftover without objects/
        os.rename(staging, self.path)

    def attach(self, repo: Path, fetched: str) -> bool:
        """Make ``repo`` a repository reading the mirror's objects (alternates). True when it
        is already checked out at ``fetched`` (hard links to a kept tree), else it is empty."""
        trees = self.path / "exploop-trees"
        fetch_fd = _lock(self.cache.root / f"{self.key}.fetch", fcntl.LOCK_EX, self.deadline)
        try:  # under the fetch lock: trees are only added and pruned under it
            kept = trees / fetched
            if kept.is_dir():
                _link_tree(kept, repo)
                os.utime(kept)
                self._replace_shallow(repo / ".git")
                return True
        finally:
            _unlock(fetch_fd)
        self._write_git(repo / ".git")
        return False

    def remember_tree(self, repo: Path, fetched: str) -> None:
        """Keep the fresh checkout at ``repo`` (hard links, read-only) for the next jobs."""
        trees = self.path / "exploop-trees"
        trees.mkdir(exist_ok=True)
        staging = trees / f".new-{fetched}-{os.getpid()}"
        fetch_fd = _lock(self.cache.root / f"{self.key}.fetch", fcntl.LOCK_EX, self.deadline)
        try:
            if (trees / fetched).is_dir():
                return
            shutil.rmtree(staging, ignore_errors=True)
            # Read-only first, so the workspace's files (the same inodes) are read-only too.
            for folder, _, files in os.walk(repo):
                for name in files:
                    path = os.path.join(folder, name)
                    mode = os.lstat(path).st_mode
                    if stat.S_ISREG(mode):
                        os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            staging.mkdir()
            _link_tree(repo, staging)
            os.rename(staging, trees / fetched)
            for old in sorted((p for p in trees.iterdir() if not p.name.startswith(".")),
                              key=lambda p: p.stat().st_mtime)[:-2]:
                shutil.rmtree(old, ignore_errors=True)  # keep the two most recent trees
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # the cache is an optimisation: never fail the job
        finally:
            _unlock(fetch_fd)

    def _replace_shallow(self, dot: Path) -> None:
        """The mirror's shallow list as it is now (a hard-linked copy is never written to)."""
        try:
            (dot / "shallow").unlink()
        except FileNotFoundError:
            pass
        if (self.path / "shallow").exists():
            shutil.copyfile(self.path / "shallow", dot / "shallow")

    def _write_git(self, dot: Path) -> None:
        """An empty repository written directly, saving the ``git init`` and ``git config`` processes."""
        for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
            (dot / sub).mkdir(parents=True, exist_ok=True)
        (dot / "HEAD").write_text("ref: refs/heads/main\n")
        (dot / "config").write_text(_WORKSPACE_CONFIG)
        (dot / "objects" / "info" / "alternates").write_text(str(self.path / "objects") + "\n")
        self._replace_shallow(dot)  # the mirror's history ends there, and so does the workspace's

    def release(self) -> None:
        """The workspace is gone: note this mirror's size, let it be evicted again, trim the cache."""
        if self._use_fd >= 0:
            self.cache.note_size(self.key)
            _unlock(self._use_fd)
            self._use_fd = -1
            self.cache.evict()


class MirrorCache:
    """Bare mirrors under ``root``, at most ``max_bytes`` in total (LRU), shared by the jobs
    of every process of one agent."""

    def __init__(self, root: str | os.PathLike, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def key(url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:32]

    def lease(self, url: str, deadline: float) -> MirrorLease:
        """Reserve the URL's mirror for a job (shared: other jobs may use it at once)."""
        key = self.key(url)
        fd = _lock(self.root / f"{key}.use", fcntl.LOCK_SH, deadline)
        return MirrorLease(self, key, fd)

    def note_size(self, key: str) -> None:
        """Record a mirror's disk size, as its last job left it: trimming the cache then walks
        no mirror's files (a job changes only its own mirror)."""
        try:
            (self.root / f"{key}.size").write_text(str(_size(self.root / f"{key}.git")))
        except OSError:
            pass  # the cache is an optimisation: trimming measures the mirror itself then

    def mirrors(self) -> list[tuple[float, str, int]]:
        """(last used, key, bytes) of every mirror, least recently used first."""
        found = []
        for path in self.root.glob("*.git"):
            key = path.name[:-4]
            try:
                used = (self.root / f"{key}.use").stat().st_mtime
            except FileNotFoundError:
                used = 0.0
            try:
                size = int((self.root / f"{key}.size").read_text())
            except (OSError, ValueError):
                size = _size(path)  # not noted yet (a job still holds it since its creation)
            found.append((used, key, size))
        return sorted(found)

    def evict(self) -> list[str]:
        """Remove least recently used mirrors that no job uses until the total fits."""
        try:
            guard = _lock(self.root / ".evict", fcntl.LOCK_EX, None)
        except BlockingIOError:
            return []  # another job is trimming the cache right now
        removed = []
        try:
            mirrors = self.mirrors()
            total = sum(size for _, _, size in mirrors)
            for _, key, size in mirrors:
                if total <= self.max_bytes:
                    break
                try:
                    use = _lock(self.root / f"{key}.use", fcntl.LOCK_EX, None)
                except BlockingIOError:
                    continue  # a job is using it
                try:
                    doomed = self.root / f".old-{key}-{os.getpid()}"
                    os.rename(self.root / f"{key}.git", doomed)
                    (self.root / f"{key}.size").unlink(missing_ok=True)
                    shutil.rmtree(doomed, ignore_errors=True)
                    total -= size
                    removed.append(key)
                finally:
                    _unlock(use)
        finally:
            _unlock(guard)
        return removed
