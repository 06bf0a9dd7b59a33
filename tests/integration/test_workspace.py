"""Workspaces and scanner processes: time limit, memory limit, size limit, clean-up, env."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.support.scanning import commit
from workers.workspace import JobError, JobTimeout, Workspace, minimal_env, run_process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(JobTimeout, match="job timeout during scanner slow: time limit reached") as info:
        run_process([sys.executable, "-c", script], cwd=str(tmp_path), env=minimal_env(str(tmp_path)),
                    deadline=time.monotonic() + 1.5, what="scanner slow")
    assert info.value.retry is True
    assert time.monotonic() - started < 10
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_memory_limit_stops_a_hungry_scanner(tmp_path):
    with pytest.raises(JobError, match=r"scanner hungry ran out of memory \(SCANNER_MEMORY_LIMIT=256 MiB\)") as info:
        run_process([sys.executable, "-c", "x = bytearray(1024 * 1024 * 1024)"], cwd=str(tmp_path),
                    env=minimal_env(str(tmp_path)), deadline=time.monotonic() + 30, what="scanner hungry",
                    memory_limit=256 * 1024 * 1024)
    assert info.value.retry is False


def test_crash_message_names_the_scanner_and_reason(tmp_path):
    with pytest.raises(JobError, match="scanner sast failed: RuntimeError: boom"):
        run_process([sys.executable, "-c", "raise RuntimeError('boom')"], cwd=str(tmp_path),
                    env=minimal_env(str(tmp_path)), deadline=time.monotonic() + 30, what="scanner sast")
    with pytest.raises(JobError, match="scanner sast was killed by SIGSEGV"):
        run_process([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
                    cwd=str(tmp_path), env=minimal_env(str(tmp_path)), deadline=time.monotonic() + 30,
                    what="scanner sast")


def test_minimal_env_carries_no_agent_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("API_KEY", "ragent_secret")
    monkeypatch.setenv("BROKER_URL", "redis://secret@host")
    env = minimal_env(str(tmp_path), str(tmp_path / "tmp"))
    assert "API_KEY" not in env and "BROKER_URL" not in env
    assert env["TMPDIR"] == str(tmp_path / "tmp") and env["HOME"] == str(tmp_path)


def test_shallow_and_full_checkout_then_directory_removed(tmp_path):
    src = tmp_path / "src"
    commit(src, {"a.txt": "1\n"}, "one")
    head = commit(src, {"a.txt": "2\n"}, "two")
    base = tmp_path / "work"
    base.mkdir()
    with Workspace("job1", time.monotonic() + 60, str(base)) as ws:
        assert ws.checkout(f"file://{src}", "main") == head
        assert ws.git("rev-list", "--count", "HEAD", what="count").strip() == "1"
        root = ws.root
    assert not root.exists() and list(base.iterdir()) == []
    with Workspace("job2", time.monotonic() + 60, str(base)) as ws:
        ws.checkout(f"file://{src}", "main", history=True)
        assert ws.git("rev-list", "--count", "HEAD", what="count").strip() == "2"
    assert list(base.iterdir()) == []


def test_bad_repository_and_ref(tmp_path):
    src = tmp_path / "src"
    commit(src, {"a.txt": "1\n"})
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        with pytest.raises(JobError, match=r"^repository file:///nonexistent/repo was not found \(or the "
                                           r"credentials given cannot see it\)$"):
            ws.checkout("file:///nonexistent/repo", "main")
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        with pytest.raises(JobError, match="ref 'no-such-branch' not found in file://"):
            ws.checkout(f"file://{src}", "no-such-branch")


def test_repository_size_limit(tmp_path):
    src = tmp_path / "src"
    commit(src, {"big.bin": "0123456789abcdef" * 64 * 1024})  # 1 MiB, compresses well
    with Workspace("job", time.monotonic() + 60, str(tmp_path), size_limit=512 * 1024) as ws:
        with pytest.raises(JobError, match=r"too large: checked-out tree 1 MiB exceed REPO_SIZE_LIMIT \(512 KiB\)"):
            ws.checkout(f"file://{src}", "main")
        assert not (ws.repo / "big.bin").exists()  # refused before checkout
    with Workspace("job", time.monotonic() + 60, str(tmp_path), size_limit=2 * 1024 * 1024) as ws:
        ws.checkout(f"file://{src}", "main")
        assert (ws.repo / "big.bin").stat().st_size == 1024 * 1024


def test_scanner_settings_from_env():
    from exploop.config import ConfigError, ScannerSettings, parse_size
    assert parse_size("4g") == 4 * 1024 ** 3 and parse_size("512MiB") == 512 * 1024 ** 2
    assert parse_size("100k") == 102400 and parse_size("2048") == 2048
    settings = ScannerSettings.from_env({"OSV_DB_DIR": "/srv/osv", "SCANNER_MEMORY_LIMIT": "2g",
                                         "REPO_SIZE_LIMIT": "200m", "SEMGREP_BIN": "none",
                                         "MIRROR_CACHE_DIR": "/srv/mirrors", "MIRROR_CACHE_SIZE": "5g"})
    assert settings == ScannerSettings(Path("/srv/osv"), 2 * 1024 ** 3, 200 * 1024 ** 2, "none",
                                       Path("/srv/mirrors"), 5 * 1024 ** 3)
    assert ScannerSettings.from_env({}) == ScannerSettings(None, 4 * 1024 ** 3, 1024 ** 3, None,
                                                           Path.home() / ".exploop" / "mirrors")
    assert ScannerSettings.from_env({"MIRROR_CACHE_SIZE": "0"}).mirror_dir is None
    assert ScannerSettings.from_env({"MIRROR_CACHE_DIR": "none"}).mirror_dir is None
    with pytest.raises(ConfigError, match="SCANNER_MEMORY_LIMIT: invalid size 'lots'"):
        ScannerSettings.from_env({"SCANNER_MEMORY_LIMIT": "lots"})
    with pytest.raises(ConfigError, match="REPO_SIZE_LIMIT: size must be positive"):
        ScannerSettings.from_env({"REPO_SIZE_LIMIT": "0"})


def test_option_like_ref_is_refused_and_never_runs(tmp_path):
    src = tmp_path / "src"
    commit(src, {"a.txt": "1\n"})
    marker = tmp_path / "pwned"
    ref = f"--upload-pack=touch {marker};git-upload-pack"
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        with pytest.raises(JobError, match="invalid ref '--upload-pack=touch"):
            ws.checkout(f"file://{src}", ref)
    assert not marker.exists()
    # Even past the check, "--" keeps git from reading a ref as an option.
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        ws.repo.mkdir()
        ws.git("init", "-q", what="git init")
        ws.git("remote", "add", "--", "origin", f"file://{src}", what="git remote add")
        with pytest.raises(JobError, match="invalid refspec"):
            ws.git("fetch", "-q", "--", "origin", ref, what="fetch")
    assert not marker.exists()


def test_api_refuses_option_like_ref(client, tenant_key):
    from tests.support.stack import auth
    for ref in ("--upload-pack=touch /tmp/x", "-x", "main branch", "a..b"):
        reply = client.post("/api/v1/jobs", headers=auth(tenant_key), json={
            "repo_url": "https://git.example.com/a/b.git", "ref": ref, "capability": "sast",
            "region": "us-east-1"})
        # 400 is intended; schema errors currently come back 422 for every field (the
        # foundation sets its 400 parser after the blueprints are decorated).
        assert reply.status_code in (400, 422), (ref, reply.get_json())
        assert reply.get_json()["error"] == "invalid request: ref"


def test_symlinks_are_not_followed_by_scanners(tmp_path):
    from workers.scanners import sca, secrets
    outside = tmp_path / "agent-home" / "agent.json"
    outside.parent.mkdir()
    outside.write_text('{"api_key": "AKIAIOSFODNN7EXAMPLE"}\n')
    src = tmp_path / "src"
    commit(src, {"README.md": "hi\n"})
    (src / "requirements.txt").symlink_to(outside)  # SCA echoes lines it cannot parse
    commit(src, {}, "add a link")
    with Workspace("job", time.monotonic() + 60, str(tmp_path)) as ws:
        ws.checkout(f"file://{src}", "main", history=True)
        link = ws.repo / "requirements.txt"
        assert not link.is_symlink() and link.read_text() == str(outside)
        assert secrets.scan(str(ws.repo))["findings"] == []
        osv = tmp_path / "osv" / "npm"
        osv.mkdir(parents=True)
        (osv / "X.json").write_text('{"id": "X", "affected": []}')
        (osv.parent / "PyPI").mkdir()
        (osv.parent / "PyPI" / "X.json").write_text('{"id": "X", "affected": []}')
        result = sca.scan(str(ws.repo), str(osv.parent))
        assert "AKIA" not in json.dumps(result)


def test_a_failing_check_kills_the_process_group_promptly(tmp_path, monkeypatch):
    """A cancelled job: the check raises while the scanner runs, and the scanner dies at once."""
    import time as _time

    from workers import workspace as ws
    monkeypatch.setattr(ws, "CHECK_INTERVAL", 0.2)
    calls = []

    class Cancelled(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) >= 2:
            raise Cancelled()

    marker = tmp_path / "child.pid"
    started = _time.monotonic()
    with pytest.raises(Cancelled):
        ws.run_process(["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], cwd=str(tmp_path),
                       env={"PATH": "/usr/bin:/bin"}, deadline=_time.monotonic() + 60, what="scanner",
                       check=check)
    assert _time.monotonic() - started < 5
    import psutil
    child = int(marker.read_text())
    _time.sleep(0.2)
    # The whole group is gone, grandchildren included (at most a zombie awaiting its reaper).
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
