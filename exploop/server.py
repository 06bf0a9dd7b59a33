"""Run the API under gunicorn (threads: agents hold connections for long-polls and leases)."""
from __future__ import annotations

import json

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

__all__ = ["serve", "JsonErrorWorker", "MAX_REQUEST_LINE"]

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

    def load(self):
        from .app import create_app
        return create_app()


def serve(host: str, port: int, workers: int, threads: int, log_level: str = "info") -> None:
    """Serve the API until SIGTERM/SIGINT (graceful: in-flight requests finish)."""
    _Gunicorn({
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "exploop.server.JsonErrorWorker",
        "threads": threads,
        "timeout": 120,
        "graceful_timeout": 30,
        "keepalive": 75,
        "loglevel": log_level,
        "accesslog": None,
        "errorlog": "-",
        "limit_request_line": MAX_REQUEST_LINE,
        # Several APIs may run on one host (tests, benchmarks): no shared control socket.
        "control_socket_disable": True,
        "child_exit": _child_exit,
    }).run()


def _child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
