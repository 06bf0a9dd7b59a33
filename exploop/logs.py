"""Logging setup for the server and agent processes (never at import time)."""
from __future__ import annotations

import json
import logging
import os
import re
import sys

__all__ = ["setup_logging"]


_FIELD = re.compile(r"\b([a-z_]+)=(\S+)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (LOG_FORMAT=json).

    Our messages end in ``key=value`` pairs (``job completed job_id=... agent=...``);
    those become fields too, so shippers can filter on job, agent and tenant ids while
    the message keeps the runbook's text for grep.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                 "logger": record.name, "message": message}
        for key, value in _FIELD.findall(message):
            entry.setdefault(key, value.rstrip(",;:"))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Log to stderr at ``level``; ``fmt="json"`` (or LOG_FORMAT=json) for JSON lines."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "text").lower()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "werkzeug", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
