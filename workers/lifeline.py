"""Processes that die with their parent: pool children and scanners never outlive the agent.

Linux's ``PR_SET_PDEATHSIG`` (through ``prctl`` with ctypes) sends the child a signal
when its parent exits, even on ``kill -9``, so a crashed agent leaves no scanner
running on as an orphan. Elsewhere it is a no-op: the agent's start-up sweep of its
workspace directory still removes the checkouts.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

__all__ = ["die_with_parent"]

PR_SET_PDEATHSIG = 1

# Loaded once at import, in the agent, never between fork and exec.
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True) \
        if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - a libc that cannot be loaded
    _libc = None


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits.

    ``parent``: the pid the caller expects as parent; if it already died (between fork
    and this call) the process exits at once instead of running on as an orphan.
    Safe in a ``preexec_fn``. Returns False where unsupported.
    """
    if _libc is None or _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    return True
