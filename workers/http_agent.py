"""``AGENT_TRANSPORT=http``: an agent that needs only outbound HTTPS to the API.

No broker connection at all. MAX_CONCURRENT_JOBS poller threads each long-poll
``POST /platform/poll``, claim the handed-out job with its handout id, run it with the
same code as the Celery task (``workers.tasks._run``: scanners, Reporter), and poll again.
The Lease Manager, metrics and memory watch are the Celery agent's. Draining: pollers
stop polling, running jobs finish. SIGTERM: stop polling, finish running jobs, release
the lease, exit 0. A job a poller received while stopping is not claimed: its handout
expires and the controller puts it back on its queue (same attempt). One received while
draining is claimed: the API refuses it (409 draining) and puts it back at once.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

from exploop.client import ApiClientError, ApiConnectionError, PlatformClient
from exploop.config import AgentSettings
from exploop.retry import backoff
from exploop.vocabulary import DesiredState

from . import tasks
from .lease_manager import KEY_REFUSED, LeaseManager
from .memory import MemoryWatch, cgroup_memory_limit

logger = logging.getLogger("exploop.agent")

__all__ = ["HttpAgent", "run_http"]


class HttpAgent:
    """Poller threads plus the Lease Manager around one AgentRuntime."""

    def __init__(self, settings: AgentSettings, runtime):
        self.settings = settings
        self.runtime = runtime
        self.stopping = threading.Event()
        self.active = threading.Event()  # set while the desired state is "active"
        if runtime.desired_state == DesiredState.ACTIVE:
            self.active.set()
        self._lock = threading.Lock()
        self._running: dict[str, str] = {}  # thread name -> job id (claimed, running)
        self._threads: list[threading.Thread] = []

    # --- state the Lease Manager reports ---------------------------------------------

    def running_jobs(self) -> list[str]:
        with self._lock:
            return sorted(self._running.values())

    def report(self) -> dict:
        jobs = self.running_jobs()
        status = "stopping" if self.stopping.is_set() else self.runtime.status()
        return {"status": status, "running_jobs": jobs, "jobs_running": len(jobs),
                "max_jobs": self.runtime.max_jobs, "version": self.runtime.version,
                "host": self.runtime.host, "nodename": f"{self.runtime.name}@{self.runtime.host}"}

    def apply_state(self, state: str) -> None:
        was = self.runtime.desired_state
        self.runtime.desired_state = state
        manager = self.runtime.lease_manager
        if state == DesiredState.DRAINING or (manager is not None and manager.held):
            self.active.clear()
        else:
            self.active.set()
        if state != was:
            logger.info("%s: %s polling", state, "stopped" if state == DesiredState.DRAINING else "resumed")

    def on_auth_failure(self) -> None:
        """The key is refused (agent deleted): one line, then exit without waiting for running
        jobs (their scanners die with the process)."""
        if not self.runtime.auth_failed:
            logger.error(KEY_REFUSED)
        self.runtime.auth_failed = True
        self.stopping.set()
        self.active.set()  # wake idle pollers so they see the stop

    # --- pollers ------------------------------------------------------------------------

    def _poller(self) -> None:
        runtime = self.runtime
        client = PlatformClient(runtime.api_url, runtime.api_key, timeout=15)
        me = threading.current_thread().name
        failures = 0
        while not self.stopping.is_set():
            if not self.active.is_set():
                self.active.wait(1.0)
                continue
            try:
                handout = client.poll(self.settings.poll_timeout)
            except ApiClientError as exc:
                if exc.status == 401:
                    self.on_auth_failure()
                    return
                if exc.status == 403 and exc.detail_field("reason") == "disabled":
                    self.stopping.wait(self.runtime.heartbeat_interval)  # the Lease Manager says so, once
                    continue
                failures += 1
                what = "failed to connect to API" if isinstance(exc, ApiConnectionError) else "API error"
                logger.warning("poll failed, retrying (%s: %s) failures=%d", what, exc.message, failures)
                self.stopping.wait(backoff(failures, base=0.5, cap=15))
                continue
            failures = 0
            if handout is None:
                continue
            self._claim_and_run(client, me, handout)

    def _claim_and_run(self, client: PlatformClient, me: str, handout: dict) -> None:
        runtime = self.runtime
        job_id, attempt = handout["job_id"], handout["attempt"]
        fields = f"job_id={job_id} attempt={attempt} agent={runtime.name}"
        with self._lock:
            if self.stopping.is_set():
                # Not claimed: the handout expires and the controller requeues it (same attempt).
                logger.info("not claiming %s (agent stopping); it returns to its queue", fields)
                return
            # Draining (a poll sent before the drain answered with a job): claim anyway; the
            # API refuses a draining agent's claim and puts the job back on its queue at once.
            self._running[me] = job_id  # busy from the claim on: SIGTERM waits for it
        try:
            try:
                spec = client.claim(job_id, attempt, handout["handout_id"], incarnation=runtime.incarnation)
            except ApiClientError as exc:
                if exc.status == 401:
                    self.on_auth_failure()
                else:
                    # Handout expired, stale or duplicate delivery, draining: not ours to run.
                    logger.info("claim refused %s: %s", fields, exc.message)
                    if isinstance(exc, ApiConnectionError):
                        time.sleep(1)
                return
            outcome = tasks._run(runtime, client, spec, fields)
            if runtime.metrics is not None:
                runtime.metrics.record_outcome(outcome)
        finally:
            with self._lock:
                self._running.pop(me, None)

    # --- lifecycle ----------------------------------------------------------------------

    def run(self) -> int:
        runtime = self.runtime
        memory = MemoryWatch(self.settings.memory_limit or cgroup_memory_limit(),
                             self.settings.memory_warn_ratio, runtime.metrics)
        observe = runtime.metrics.heartbeat_latency.observe if runtime.metrics else (lambda s: None)
        manager = LeaseManager(runtime.client, runtime.heartbeat_interval, self.report, self.apply_state,
                               self.on_auth_failure, observe_latency=observe, after_renewal=memory.check,
                               hold=lambda held: self.apply_state(runtime.desired_state),
                               incarnation=runtime.incarnation)
        runtime.lease_manager = manager
        if runtime.metrics is not None:
            runtime.metrics.jobs_running.set_function(lambda: float(len(self.running_jobs())))

        def on_signal(signum, frame):
            if not self.stopping.is_set():
                logger.info("warm shutdown (%s): stop polling, finishing %d running job(s)",
                            signal.Signals(signum).name, len(self.running_jobs()))
            self.stopping.set()
            self.active.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        manager.start()
        for n in range(runtime.max_jobs):
            # Daemon threads: an idle poller blocked in a long-poll must not delay the exit.
            thread = threading.Thread(target=self._poller, name=f"poller-{n + 1}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("starting agent name=%s region=%s queues=%s transport=http pollers=%d"
                    " poll_timeout=%ss desired_state=%s", runtime.name, runtime.region,
                    ",".join(runtime.queues), runtime.max_jobs, self.settings.poll_timeout,
                    runtime.desired_state)
        while not self.stopping.wait(0.5):
            pass
        # Running jobs finish (the lease keeps being renewed meanwhile).
        manager.wake()  # announce the stop: the agent shows "stopping" while jobs finish
        # A refused key does not wait: the jobs already run elsewhere.
        while self.running_jobs() and not runtime.auth_failed:  # none is added once stopping is set
            time.sleep(0.2)
        manager.stop(release=not runtime.auth_failed)
        if runtime.auth_failed:
            return 1
        logger.info("agent stopped name=%s", runtime.name)
        return 0


def run_http(settings: AgentSettings, runtime) -> int:
    """Run the HTTP agent until SIGTERM (or its key is refused)."""
    return HttpAgent(settings, runtime).run()
