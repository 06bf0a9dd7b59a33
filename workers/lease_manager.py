"""The Lease Manager: renews the agent's lease and applies the desired state it gets back.

It runs in its own thread, not on the worker's event loop: during a warm shutdown
the loop stops while running jobs finish, and the lease must go on (Buildkite lost
agents that stopped heartbeating mid-drain). Renewals come every
HEARTBEAT_INTERVAL with +-10% jitter; failures retry with capped exponential
backoff, always before the lease could expire.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from exploop.client import ApiClientError, ApiConnectionError, PlatformClient

logger = logging.getLogger("exploop.agent")

__all__ = ["LeaseManager"]


class LeaseManager:
    """Keep ``exploop:lease:<agent>`` alive through ``PUT /platform/lease``."""

    def __init__(self, client: PlatformClient, interval: float, report: Callable[[], dict],
                 apply_state: Callable[[str], None], on_auth_failure: Callable[[], None],
                 observe_latency: Callable[[float], None] = lambda seconds: None,
                 after_renewal: Callable[[], object] = lambda: None):
        self.client = client
        self.observe_latency = observe_latency
        self.after_renewal = after_renewal
        self.interval = interval
        self.report = report
        self.apply_state = apply_state
        self.on_auth_failure = on_auth_failure
        self.desired_state: str | None = None
        self.lease_ttl: float | None = None
        self.last_renewal: float | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def renew(self) -> bool:
        """Renew once; return True on success."""
        body = dict(self.report(), heartbeat_interval=self.interval)
        started = time.monotonic()
        try:
            reply = self.client.renew_lease(body, timeout=max(1.0, min(10.0, self.interval)))
        except ApiClientError as exc:
            self.failures += 1
            if exc.status == 401:
                logger.error("authentication failed: the API refused this agent's key; stopping")
                self._stop.set()
                self.on_auth_failure()
                return False
            what = "failed to connect to API" if isinstance(exc, ApiConnectionError) else "API error"
            logger.warning("lease renewal failed, retrying (%s: %s) failures=%d",
                           what, exc.message, self.failures)
            return False
        self.failures = 0
        self.last_renewal = time.monotonic()
        self.lease_ttl = reply["lease_ttl"]
        latency = self.last_renewal - started
        self.observe_latency(latency)
        logger.info("lease renewed successfully agent=%s ttl=%s desired_state=%s latency=%.3fs",
                    reply["agent"], reply["lease_ttl"], reply["desired_state"], latency)
        self.desired_state = reply["desired_state"]
        self.apply_state(reply["desired_state"])
        return True

    def lease_remaining(self) -> float:
        """Seconds left on the lease as this agent last renewed it (0 when never or expired)."""
        if self.last_renewal is None or self.lease_ttl is None:
            return 0.0
        return max(0.0, self.lease_ttl - (time.monotonic() - self.last_renewal))

    def next_delay(self) -> float:
        if self.failures == 0:
            return self.interval * random.uniform(0.9, 1.1)
        # Back off, but always try again well inside one interval.
        return min(self.interval, 0.5 * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.renew()
            except Exception:  # never let the heartbeat thread die
                logger.exception("lease renewal failed, retrying")
                self.failures += 1
            try:
                self.after_renewal()
            except Exception:
                logger.exception("periodic agent check failed")
            if self._stop.wait(self.next_delay()):
                break

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease-manager", daemon=True)
        self._thread.start()

    def stop(self, release: bool = False) -> None:
        """Stop renewing; with ``release``, drop the lease so the agent shows offline at once."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        if release:
            try:
                self.client.release_lease()
            except ApiClientError as exc:
                logger.warning("could not release lease: %s", exc.message)
