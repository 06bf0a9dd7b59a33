"""The one backoff rule of the agents and the CLI: capped, exponential, jittered.

Jitter spreads a fleet's retries (a thousand agents that lost the API at once must not
come back in lock step), and only ever shortens a delay, so a cap stays a promise (the
Lease Manager's cap is its heartbeat interval: a retry always comes before the lease could
expire).
"""
from __future__ import annotations

import random

__all__ = ["backoff"]


def backoff(attempt: int, *, base: float = 0.5, cap: float = 15.0, jitter: float = 0.2) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first): ``base * 2**attempt``,
    at most ``cap``, less a random share of up to ``jitter`` of it."""
    delay = min(cap, base * 2 ** min(max(attempt, 0), 32))
    return delay * random.uniform(1 - jitter, 1.0)
