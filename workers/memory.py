"""Memory watch: the agent's memory (all its processes) against its limit.

Logs "high memory usage" when the agent passes MEMORY_WARN_RATIO of its limit
(MEMORY_LIMIT, else the container's cgroup limit), at most once every five
minutes while it stays high.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import psutil

logger = logging.getLogger("exploop.agent")

__all__ = ["MemoryWatch", "cgroup_memory_limit"]

def cgroup_memory_limit() -> int | None:
    """The container's memory limit (cgroup v2 or v1), or None when unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:  # v1 reports a huge number for "no limit"
            return int(raw)
    return None


class MemoryWatch:
    def __init__(self, limit: int | None, warn_ratio: float, metrics=None):
        self.limit = limit
        self.warn_ratio = warn_ratio
        self.metrics = metrics
        self._last_warning = 0.0
        if metrics is not None:
            metrics.memory_limit.set(limit or 0)
            metrics.memory_bytes.set_function(self.usage)  # fresh at every scrape

    @staticmethod
    def usage() -> int:
        """Memory of this process and all its descendants (pool, scanners), as PSS:
        summing RSS would count the pages the forked pool shares once per process."""
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def check(self) -> int:
        used = self.usage()
        if self.limit and used > self.warn_ratio * self.limit:
            now = time.monotonic()
            if now - self._last_warning > 300:
                self._last_warning = now
                logger.warning("high memory usage used_bytes=%d limit_bytes=%d ratio=%.2f",
                               used, self.limit, used / self.limit)
        return used
