"""Logging setup for the server and agent processes (never at import time)."""
from __future__ import annotations

import json
import logging
import os
import re
import sys

__all__ = ["setup_logging", "TextFormatter", "escape_controls"]


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``): one record, one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() in "\n\r\t" else
                        f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text)


class TextFormatter(logging.Formatter):
    """The text format with every message on one line: values from tenants (a repository URL,
    a ref, an error) cannot forge log lines. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Log to stderr at ``level``; ``fmt="json"`` (or LOG_FORMAT=json) for JSON lines."""
    fmt = (fmt or os.environ.get("LOG_FORMAT") or "text").lower()
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "werkzeug", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
