"""Run the API under gunicorn (threads: agents hold connections for long-polls and leases).

The settings are sized for a fleet: every agent renews its lease every
HEARTBEAT_INTERVAL (30 s) over a kept-alive connection, reports jobs, and may
hold a request open for up to POLL_TIMEOUT (30 s). docs/deployment.md explains
each value. Operators change any gunicorn setting the standard way, e.g.
``GUNICORN_CMD_ARGS="--worker-connections 8000 --forwarded-allow-ips=*"``;
those win over the values here.
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

__all__ = ["serve", "gunicorn_options", "JsonErrorWorker", "MAX_REQUEST_LINE"]

#: Longest request line (method, URI, version) gunicorn reads: its maximum. Every valid
#: request fits (the longest query the API takes is about 5 KiB percent-encoded);
#: longer ones get 414 from the server itself, before the app.
MAX_REQUEST_LINE = 8190


def _write_json_error(sock, status_int, reason, mesg):
    """gunicorn's own error answer (bad request line, 414, 431...), as the API's JSON."""
    body = json.dumps({"error": reason.lower(), "detail": mesg or None}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin1") + body)


class JsonErrorWorker(ThreadWorker):
    """gthread worker whose server-level errors are JSON like the app's, never HTML."""

    def init_process(self):
        # gunicorn writes these errors through one module function; this process
        # serves only the API, so it answers them all in the API's format.
        util.write_error = _write_json_error
        super().init_process()


class _Gunicorn(BaseApplication):
    def __init__(self, options: dict):
        self.options = options
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)
        # GUNICORN_CMD_ARGS, parsed as gunicorn's own command line does.
        env_args = self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env())
        for key, value in vars(env_args).items():
            if value is not None and key != "args":
                self.cfg.set(key.lower(), value)

    def load(self):
        # Lazy: the app (and prometheus_client) load after PROMETHEUS_MULTIPROC_DIR is set.
        from ..api.app import create_app
        app = create_app()
        # What the app holds for its life (modules, mappers, schemas, routes) leaves the
        # collector's sight: a full collection then walks only what requests made, not the
        # whole app on every request that happens to trigger one.
        gc.collect()
        gc.freeze()
        return app


def gunicorn_options(host: str, port: int, workers: int, threads: int,
                     log_level: str = "info") -> dict:
    """The gunicorn settings of ``exploop api`` (before GUNICORN_CMD_ARGS)."""
    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        # gthread (one thread per in-flight request; idle kept-alive connections wait in
        # the worker's poller and cost no thread) whose own errors are JSON like the app's.
        "worker_class": "exploop.run.gunicorn.JsonErrorWorker",
        "threads": threads,
        # Open connections per worker, idle keep-alives included: one per agent
        # (a lease every 30 s keeps it open), so workers x this bounds the fleet size.
        "worker_connections": 4000,
        "backlog": 2048,
        # Longer than the agents' 30 s heartbeat, so each agent reuses one connection;
        # longer than a load balancer's usual 60 s idle timeout, so the balancer closes
        # first and never sends a request onto a socket gunicorn is closing (502s).
        "keepalive": 75,
        # The arbiter kills a worker whose main loop has not checked in for this long;
        # a gthread worker's loop is not blocked by slow requests, only by a real hang.
        "timeout": 120,
        # SIGTERM: stop accepting, let in-flight requests finish; longer than a 30 s
        # long-poll, shorter than compose's and Kubernetes' 60 s stop grace.
        "graceful_timeout": 45,
        # Recycle workers now and then (memory growth in long-running processes);
        # the jitter keeps the workers from restarting together.
        "max_requests": 20000,
        "max_requests_jitter": 2000,
        "loglevel": log_level,
        "accesslog": None,
        "errorlog": "-",
        "limit_request_line": MAX_REQUEST_LINE,
        # Several APIs may run on one host (tests, benchmarks): no shared control socket.
        "control_socket_disable": True,
        "child_exit": _child_exit,
    }
    # Worker heartbeat files on a tmpfs: on a container's overlay filesystem a
    # blocked disk write can stall the heartbeat and get healthy workers killed.
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        options["worker_tmp_dir"] = "/dev/shm"
    return options


def serve(host: str, port: int, workers: int, threads: int, log_level: str = "info") -> None:
    """Serve the API until SIGTERM/SIGINT (graceful: in-flight requests finish)."""
    _Gunicorn(gunicorn_options(host, port, workers, threads, log_level)).run()


def _child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess  # lazy: imported once PROMETHEUS_MULTIPROC_DIR is set
    multiprocess.mark_process_dead(worker.pid)
