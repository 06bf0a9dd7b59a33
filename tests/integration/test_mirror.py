"""The agent's cache of bare mirrors: checkouts borrow its objects, a rescan fetches only
new objects, the cache is bounded (LRU) and never loses a mirror a running job uses, and
concurrent jobs of one repository are safe."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.support.scanning import commit, git
from workers.mirror import MirrorCache
from workers.workspace import JobError, Workspace


def _objects(mirror) -> int:
    out = subprocess.run(["git", "--git-dir", str(mirror), "count-objects", "-v"], capture_output=True,
                         text=True, check=True).stdout
    stats = dict(line.split(": ") for line in out.splitlines())
    return int(stats["in-pack"]) + int(stats["count"])  # packed and loose


def _checkout(tmp_path, cache, repo, history=False, ref="main"):
    with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=cache) as ws:
        head = ws.checkout(f"file://{repo}", ref, history=history)
        shallow = git(ws.repo, "rev-parse", "--is-shallow-repository").strip()
        count = int(git(ws.repo, "rev-list", "--count", "HEAD").strip())
        files = sorted(p.name for p in ws.repo.iterdir() if p.name != ".git")
        local_packs = list((ws.repo / ".git" / "objects" / "pack").glob("*.pack"))
        return head, shallow, count, files, local_packs, ws.lease.path


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "src"
    commit(path, {f"pkg/mod{n}.py": f"VALUE = {n}\n" * 50 for n in range(40)}, "first")
    commit(path, {"README.md": "demo\n"}, "second")
    return path


def test_rescan_fetches_only_new_objects(tmp_path, repo):
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)
    head, shallow, count, files, local, mirror = _checkout(tmp_path, cache, repo)
    assert head == git(repo, "rev-parse", "HEAD").strip() and files == ["README.md", "pkg"]
    assert shallow == "true" and count == 1 and local == []  # objects borrowed, not copied
    objects = _objects(mirror)
    assert _checkout(tmp_path, cache, repo)[0] == head and _objects(mirror) == objects  # unchanged: nothing
    new = commit(repo, {"pkg/mod3.py": "VALUE = 'changed'\n"}, "third")
    assert _checkout(tmp_path, cache, repo)[0] == new
    assert _objects(mirror) - objects <= 4  # commit, root tree, pkg tree, blob: not the other 39 files
    assert "file://" not in (mirror / "config").read_text()  # no URL (or credential) kept


def test_history_job_after_shallow_ones_sees_every_commit(tmp_path, repo):
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)
    assert _checkout(tmp_path, cache, repo)[1:3] == ("true", 1)
    head, shallow, count, *_ = _checkout(tmp_path, cache, repo, history=True)
    assert (shallow, count) == ("false", 2)
    assert _checkout(tmp_path, cache, repo)[1:3] == ("false", 2)  # a full mirror stays full
    assert _checkout(tmp_path, cache, repo, ref=head)[0] == head  # a commit id as the ref


def test_missing_ref_and_repository_fail_clearly(tmp_path, repo):
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)
    with pytest.raises(JobError, match="ref 'nope' not found in file://"):
        _checkout(tmp_path, cache, repo, ref="nope")
    with pytest.raises(JobError, match="was not found"):
        _checkout(tmp_path, cache, tmp_path / "nowhere")
    assert _checkout(tmp_path, cache, repo)[0]  # a failed fetch leaves a usable mirror


def test_cache_is_bounded_lru_and_keeps_mirrors_in_use(tmp_path):
    repos = []
    for n in range(3):
        path = tmp_path / f"src{n}"
        commit(path, {"blob.txt": f"{n}\n" + "x" * 200_000})
        repos.append(path)
    probe = MirrorCache(tmp_path / "probe", 1024 ** 3)
    _checkout(tmp_path, probe, repos[0])
    one = probe.mirrors()[0][2]
    cache = MirrorCache(tmp_path / "mirrors", int(one * 2.5))  # room for two mirrors
    for path in repos[:2]:
        _checkout(tmp_path, cache, path)
    _checkout(tmp_path, cache, repos[0])  # repos[0] is now the most recently used
    _checkout(tmp_path, cache, repos[2])
    kept = {key for _, key, _ in cache.mirrors()}
    assert kept == {cache.key(f"file://{repos[0]}"), cache.key(f"file://{repos[2]}")}  # src1 evicted
    assert sum(size for *_, size in cache.mirrors()) <= cache.max_bytes

    tiny = MirrorCache(tmp_path / "mirrors", 1)  # everything is over the limit now
    with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=tiny) as ws:
        ws.checkout(f"file://{repos[1]}", "main")
        tiny.evict()  # as another job finishing would
        assert {key for _, key, _ in tiny.mirrors()} == {tiny.key(f"file://{repos[1]}")}  # in use: kept
        assert (ws.repo / "blob.txt").read_text().startswith("1\n")
        assert git(ws.repo, "cat-file", "-t", "HEAD").strip() == "commit"
    assert tiny.mirrors() == []  # released, then evicted


def test_concurrent_jobs_of_one_repository(tmp_path, repo):
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)
    results, errors = [], []

    def job(n):
        try:
            results.append(_checkout(tmp_path, cache, repo, history=n % 2 == 0)[0])
        except Exception as exc:  # reported below
            errors.append(exc)

    for _ in range(2):
        threads = [threading.Thread(target=job, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        head = git(repo, "rev-parse", "HEAD").strip()
        assert errors == [] and results == [head] * 4
        results.clear()
        commit(repo, {"README.md": f"rev {time.monotonic()}\n"})


def test_symlinks_stay_plain_files_and_the_size_limit_applies(tmp_path):
    src = tmp_path / "src"
    commit(src, {"big.bin": "x" * (1024 * 1024)})
    (src / "agent-key").symlink_to("/etc/hostname")
    commit(src, {})
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)
    with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=cache, size_limit=512 * 1024) as ws:
        with pytest.raises(JobError, match="is too large: checked-out tree 1 MiB exceed REPO_SIZE_LIMIT"):
            ws.checkout(f"file://{src}", "main")
    for _ in range(2):  # computed, then remembered for the commit
        with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=cache,
                       size_limit=4 * 1024 * 1024) as ws:
            head = ws.checkout(f"file://{src}", "main")
            assert head == git(src, "rev-parse", "HEAD").strip()
            link = ws.repo / "agent-key"
            assert not link.is_symlink() and link.read_text() == "/etc/hostname"


def test_a_rescan_gets_the_kept_tree_as_read_only_hard_links(tmp_path, repo):
    cache = MirrorCache(tmp_path / "mirrors", 1024 ** 3)

    def links():
        with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=cache) as ws:
            ws.checkout(f"file://{repo}", "main")
            path = ws.repo / "pkg" / "mod1.py"
            assert path.read_text() == "VALUE = 1\n" * 50
            assert git(ws.repo, "ls-files").splitlines()[0] == "README.md"
            return path.stat().st_ino, path.stat().st_nlink, path.stat().st_mode & 0o222
    inode, count, writable = links()
    assert (count, writable) == (2, 0)  # checked out, then kept (read-only: never edited in place)
    assert links() == (inode, 2, 0)  # the rescan's file is the kept one (the same inode): no checkout
    commit(repo, {"pkg/mod1.py": "VALUE = 1\n" * 50 + "# new\n"})
    with Workspace("job", time.monotonic() + 60, str(tmp_path), mirrors=cache) as ws:
        ws.checkout(f"file://{repo}", "main")
        assert (ws.repo / "pkg" / "mod1.py").read_text().endswith("# new\n")
    commit(repo, {"README.md": "third\n"})
    _checkout(tmp_path, cache, repo)
    [mirror] = (tmp_path / "mirrors").glob("*.git")
    assert len([p for p in (mirror / "exploop-trees").iterdir() if not p.name.startswith(".")]) == 2
