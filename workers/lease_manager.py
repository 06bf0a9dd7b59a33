"""The Lease Manager: renews the agent's lease and applies the desired state it gets back.

It runs in its own thread, not on the worker's event loop: during a warm shutdown
the loop stops while running jobs finish, and the lease must go on (Buildkite lost
agents that stopped heartbeating mid-drain). Renewals come every
HEARTBEAT_INTERVAL with +-10% jitter; failures retry with capped exponential
backoff, always before the lease could expire.

Every renewal carries this start's incarnation id (the API requeues what a previous
start held) and the jobs a dead pool child lost. An agent whose own lease ran out
fences itself: it logs ``lease expired`` and stops taking jobs (``hold``) until a
renewal succeeds again, because the controller may be handing its jobs to others.
A disabled agent (403 ``disabled``) is held the same way until an admin enables it.
"""
from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Callable

from exploop.client import ApiClientError, ApiConnectionError, PlatformClient
from exploop.retry import backoff

logger = logging.getLogger("exploop.agent")

__all__ = ["LeaseManager", "KEY_REFUSED", "KEY_REFUSED_SIGNAL"]

#: The one line an agent logs when the API refuses its key (at renewal or at a report).
KEY_REFUSED = ("authentication failed: the API refused this agent's key (agent deleted, or wrong key);"
               " killing running scans and exiting")
#: What a prefork child sends the agent's main process when a report is answered 401.
KEY_REFUSED_SIGNAL = signal.SIGUSR2


class LeaseManager:
    """Keep ``exploop:lease:<agent>`` alive through ``PUT /platform/lease``."""

    def __init__(self, client: PlatformClient, interval: float, report: Callable[[], dict],
                 apply_state: Callable[[str], None], on_auth_failure: Callable[[], None],
                 observe_latency: Callable[[float], None] = lambda seconds: None,
                 after_renewal: Callable[[], object] = lambda: None,
                 hold: Callable[[bool], None] = lambda held: None, incarnation: str | None = None):
        self.client = client
        self.observe_latency = observe_latency
        self.after_renewal = after_renewal
        self.interval = interval
        self.report = report
        self.apply_state = apply_state
        self.on_auth_failure = on_auth_failure
        self.hold = hold
        self.incarnation = incarnation
        self.desired_state: str | None = None
        self.lease_ttl: float | None = None
        self.last_renewal: float | None = None
        self.failures = 0
        self.fenced = False  # our lease ran out: take no job until a renewal succeeds
        self.disabled = False  # an admin disabled this agent: take no job until enabled
        self.auth_failed = False
        self._lost: dict[tuple[str, int], str] = {}  # (job id, attempt) -> reason, until reported
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True while the agent must not take jobs (fenced or disabled)."""
        return self.fenced or self.disabled

    def lost(self, job_id: str, attempt: int, reason: str) -> None:
        """A job this agent no longer runs (its pool child died): report it at once."""
        with self._lock:
            self._lost[(job_id, attempt)] = reason
        self.wake()

    def wake(self) -> None:
        """Renew now instead of at the next interval (a stop to announce, a lost job)."""
        self._wake.set()

    def renew(self) -> bool:
        """Renew once; return True on success."""
        with self._lock:
            lost = dict(self._lost)
        body = dict(self.report(), heartbeat_interval=self.interval)
        if self.incarnation:
            body["incarnation"] = self.incarnation
        if lost:
            body["lost_jobs"] = [{"job_id": job_id, "attempt": attempt, "reason": reason}
                                 for (job_id, attempt), reason in lost.items()]
        started = time.monotonic()
        try:
            reply = self.client.renew_lease(body, timeout=max(1.0, min(10.0, self.interval)))
        except ApiClientError as exc:
            self.failures += 1
            if exc.status == 401:  # on_auth_failure logs the one line and stops the agent
                self.auth_failed = True
                self._stop.set()
                self.on_auth_failure()
                return False
            if exc.status == 403 and exc.detail_field("reason") == "disabled":
                self.failures = 0  # the API answers: renew at the normal pace, no backoff
                if not self.disabled:
                    # "authentication failed" keeps the runbook's pattern and its advice ("check if
                    # admin disabled agent") true; the rest of the line says it is that.
                    logger.error("authentication failed: agent disabled by an admin; taking no jobs until"
                                 " enabled (%s)", exc.message)
                    self.disabled = True
                    self.hold(True)
                return False
            what = "failed to connect to API" if isinstance(exc, ApiConnectionError) else "API error"
            logger.warning("lease renewal failed, retrying (%s: %s) failures=%d",
                           what, exc.message, self.failures)
            self._check_expiry()
            return False
        self.failures = 0
        self.last_renewal = time.monotonic()
        self.lease_ttl = reply["lease_ttl"]
        with self._lock:
            for key in lost:
                self._lost.pop(key, None)
        latency = self.last_renewal - started
        self.observe_latency(latency)
        logger.info("lease renewed successfully agent=%s ttl=%s desired_state=%s latency=%.3fs",
                    reply["agent"], reply["lease_ttl"], reply["desired_state"], latency)
        self.desired_state = reply["desired_state"]
        if self.held:
            logger.warning("lease renewed after %s: taking jobs again as %s",
                           "being disabled" if self.disabled else "it expired", reply["desired_state"])
            self.fenced = self.disabled = False
            self.hold(False)
        self.apply_state(reply["desired_state"])
        return True

    def _check_expiry(self) -> None:
        """Fence this agent once its own lease has run out."""
        if self.fenced or self.last_renewal is None or self.lease_remaining() > 0:
            return
        self.fenced = True
        logger.error("lease expired: no renewal for %.0fs (ttl %ss); taking no jobs until the API"
                     " answers again", time.monotonic() - self.last_renewal, self.lease_ttl)
        self.hold(True)

    def lease_remaining(self) -> float:
        """Seconds left on the lease as this agent last renewed it (0 when never or expired)."""
        if self.last_renewal is None or self.lease_ttl is None:
            return 0.0
        return max(0.0, self.lease_ttl - (time.monotonic() - self.last_renewal))

    def next_delay(self) -> float:
        if self.failures == 0:
            return self.interval * random.uniform(0.9, 1.1)
        # Back off, but always try again well inside one interval, and wake when the lease
        # runs out so the fence goes up on time.
        delay = backoff(self.failures - 1, base=0.5, cap=self.interval)
        remaining = self.lease_remaining()
        return min(delay, remaining + 0.01) if remaining > 0 else delay

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.renew()
            except Exception:  # never let the heartbeat thread die
                logger.exception("lease renewal failed, retrying")
                self.failures += 1
            try:
                self.after_renewal()
            except Exception:
                logger.exception("periodic agent check failed")
            delay = self.next_delay()
            if self._wake.wait(delay) and not self._stop.is_set():
                continue
            if self._stop.is_set():
                break
            self._check_expiry()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease-manager", daemon=True)
        self._thread.start()

    def stop(self, release: bool = False) -> None:
        """Stop renewing; with ``release``, tell the API this agent stopped (it shows offline
        at once, and no "lease expired" alert follows)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=15)
        if release:
            try:
                self.client.release_lease()
            except ApiClientError as exc:
                if exc.status == 401:  # refused key: already said so, once
                    self.auth_failed = True
                else:
                    logger.warning("could not release lease: %s", exc.message)
