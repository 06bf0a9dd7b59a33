"""Run the API under gunicorn (threads: agents hold connections for long-polls and leases)."""
from __future__ import annotations

from gunicorn.app.base import BaseApplication

__all__ = ["serve"]


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
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 120,
        "graceful_timeout": 30,
        "keepalive": 75,
        "loglevel": log_level,
        "accesslog": None,
        "errorlog": "-",
        # Several APIs may run on one host (tests, benchmarks): no shared control socket.
        "control_socket_disable": True,
        "child_exit": _child_exit,
    }).run()


def _child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges from the merged metrics."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)
