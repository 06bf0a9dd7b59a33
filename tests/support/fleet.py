"""Reading what a fleet did from its processes' logs: executions per job, pool children."""
from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["executions", "completions", "children_of", "alive", "signal_all"]

_STARTED = re.compile(r"job started job_id=(\w+) attempt=(\d+)")
_COMPLETED = re.compile(r"job completed job_id=(\w+) attempt=(\d+)")


def _count(agents, pattern: re.Pattern) -> dict[str, int]:
    counts: dict[str, int] = {}
    for agent in agents:
        for match in pattern.finditer(agent.output()):
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


def executions(agents) -> dict[str, int]:
    """How many times each job's scan started (a successful claim), over every agent's log."""
    return _count(agents, _STARTED)


def completions(agents) -> dict[str, int]:
    """How many times an agent logged ``job completed`` (the API accepted the result) per job."""
    return _count(agents, _COMPLETED)


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
