"""What the agent enforces around the fetch itself: the destination policy checked right before
git connects (and git pinned to the checked addresses), and REPO_SIZE_LIMIT while the
objects arrive, not after."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from exploop.destinations import DestinationPolicy
from tests.support.git_server import PrivateGitHost
from workers.workspace import JobError, RepoTooLarge, Workspace

ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
           GIT_COMMITTER_EMAIL="t@example.com")


def _repo(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "i"]):
        subprocess.run(cmd, cwd=path, env=ENV, check=True)
    return path


@pytest.fixture
def git_host(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    with PrivateGitHost(tmp_path / "root", tmp_path, "oauth2", "pw") as host:
        monkeypatch.setenv("GIT_SSL_CAINFO", str(host.cert))
        yield host


def test_agent_refuses_a_loopback_destination_before_connecting(tmp_path, git_host):
    url = git_host.publish("app.git", _repo(tmp_path / "src", {"a": b"1\n"}))
    private = url.replace("https://", "https://oauth2:pw@")
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        with pytest.raises(JobError) as caught:
            ws.checkout(private, "main", destinations=DestinationPolicy())
    assert str(caught.value) == ("repository host '127.0.0.1' is refused by the destination policy: repositories"
                                 " must be on public addresses, or on hosts the operator allows")
    assert caught.value.retry is False and git_host.requests == []
    # The operator's allow-list lets the same fetch through, credentials and all.
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        assert len(ws.checkout(private, "main", destinations=DestinationPolicy.parse("127.0.0.1/32", ""))) == 40
    assert git_host.authorized_fetches() >= 1


def test_closed_and_open_ports_read_the_same(tmp_path, git_host):
    """An allowed host that refuses the connection and one that answers 5xx give one sentence."""
    url = git_host.publish("app.git", _repo(tmp_path / "src", {"a": b"1\n"})).replace("https://", "https://oauth2:pw@")
    policy = DestinationPolicy.parse("127.0.0.1/32", "")
    git_host.fail_next = 1
    errors = []
    for target in (url, "https://127.0.0.1:1/app.git"):
        with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
            with pytest.raises(JobError) as caught:
                ws.checkout(target, "main", destinations=policy)
        errors.append(str(caught.value).replace(f":{git_host.port}", ":1").replace("***@", ""))
    assert errors[0] == errors[1] == ("the repository host of https://127.0.0.1:1/app.git could not be reached or"
                                      " failed while sending it; the job will be retried")


def test_size_limit_stops_the_fetch_while_it_runs(tmp_path):
    """60 MiB of incompressible history against a 4 MiB limit: git is stopped long before it
    has it all, and the workspace is removed."""
    source = _repo(tmp_path / "big", {f"blob{i}.bin": os.urandom(6 * 1024 * 1024) for i in range(10)})
    limit = 4 * 1024 * 1024
    with Workspace("job", time.monotonic() + 120, str(tmp_path), size_limit=limit) as ws:
        with pytest.raises(RepoTooLarge) as caught:
            ws.checkout(f"file://{source}", "main")
        objects = sum(f.stat().st_size for f in (ws.repo / ".git" / "objects").rglob("*") if f.is_file())
        root = ws.root
    assert str(caught.value) == (f"repository file://{source} is too large: the fetch passed REPO_SIZE_LIMIT"
                                 " (4 MiB) and was stopped")
    # What git had written when it was stopped: far from the 60 MiB it was fetching.
    assert objects < 30 * 1024 * 1024, objects
    assert not root.exists()
