#!/usr/bin/env python3
"""HEALTHCHECK of the exploopio/agent:platform image (stdlib only: it runs every 30 s).

Healthy when the agent's metrics endpoint answers: ``GET
http://127.0.0.1:$METRICS_PORT/metrics`` (default 9100) returns 200. That proves
the agent process is alive and its main loop serves requests; whether its lease
is valid is a fleet question, answered by ``exploop_agent_status`` and the
PlatformAgentOffline alert, not by restarting the container.

Fallback, when nothing listens there (METRICS_PORT=off, or an agent build that
serves no metrics): healthy when an ``exploop-agent`` process is alive (not a
zombie) and the agent has an identity: API_KEY is set or its saved key file
(``$EXPLOOP_STATE_DIR`` or ``$HOME/.exploop``: ``agents/$AGENT_NAME.json``, or
``agent.json``) exists.

An endpoint that answers with an error or times out is unhealthy: the process is
there but hung. Exit 0 healthy, 1 unhealthy, with one line saying why.
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

PROC = Path(os.environ.get("EXPLOOP_HEALTHCHECK_PROC", "/proc"))


def metrics_url() -> str | None:
    """The agent's metrics URL, or None when METRICS_PORT turns the endpoint off."""
    port = (os.environ.get("METRICS_PORT") or "9100").strip().lower()
    if port in ("off", "none", "disabled"):
        return None
    return f"http://127.0.0.1:{port}/metrics"


def check_metrics(url: str, timeout: float = 5.0) -> tuple[bool | None, str]:
    """(True, why) healthy, (False, why) unhealthy, (None, why) nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return True, f"metrics endpoint {url} answered {reply.status}"
    except urllib.error.HTTPError as exc:
        return False, f"metrics endpoint {url} answered {exc.code}"
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return None, f"nothing listens on {url}"
        return False, f"metrics endpoint {url}: {exc.reason}"
    except TimeoutError:
        return False, f"metrics endpoint {url} timed out after {timeout:.0f}s"


def agent_processes() -> list[int]:
    """PIDs of live (non-zombie) processes running ``exploop-agent``.

    It is argv[0] (a frozen build) or argv[1] (python running the console script);
    tini's own argv ``tini -- exploop-agent`` does not count.
    """
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
        if state != "Z" and any(os.path.basename(arg) == b"exploop-agent" for arg in argv[:2]):
            found.append(int(entry.name))
    return found


def identity() -> str | None:
    """Where the agent's key comes from, or None when it has none."""
    if os.environ.get("API_KEY"):
        return "API_KEY"
    state_dir = os.environ.get("EXPLOOP_STATE_DIR") or os.path.join(
        os.environ.get("HOME") or os.path.expanduser("~"), ".exploop")
    # One key file per AGENT_NAME (agents/<name>.json); agent.json without a name, or from
    # before keys were saved per name.
    name = os.environ.get("AGENT_NAME", "").strip()
    candidates = ([Path(state_dir) / "agents" / f"{name}.json"] if name else []) + [Path(state_dir) / "agent.json"]
    return next((str(path) for path in candidates if path.is_file()), None)


def main() -> int:
    url = metrics_url()
    reason = "METRICS_PORT=off"
    if url is not None:
        healthy, reason = check_metrics(url)
        if healthy is not None:
            print(("healthy: " if healthy else "unhealthy: ") + reason)
            return 0 if healthy else 1
    pids = agent_processes()
    if not pids:
        print(f"unhealthy: {reason} and no exploop-agent process is running")
        return 1
    source = identity()
    if source is None:
        print(f"unhealthy: {reason}; exploop-agent runs (pid {pids[0]}) but has no key yet"
              " (no API_KEY, no saved agent.json)")
        return 1
    print(f"healthy: {reason}; exploop-agent runs (pid {pids[0]}) with its key from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
