"""Worker bootsteps: the Lease Manager, and the desired state applied before consuming."""
from __future__ import annotations

import logging
import os
import signal

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from exploop.broker import Broker, KeyLayout, redis_client
from exploop.vocabulary import DesiredState

from .lease_manager import KEY_REFUSED, KEY_REFUSED_SIGNAL, LeaseManager
from .memory import MemoryWatch, cgroup_memory_limit

logger = logging.getLogger("exploop.agent")

__all__ = ["LeaseStep", "DesiredStateStep", "StallWatchStep", "running_jobs"]


def running_jobs() -> list[str]:
    """Ids of the jobs this worker is running (parent process view)."""
    ids = []
    for request in list(worker_state.active_requests):
        kwargs = request.kwargs or {}
        if kwargs.get("job_id"):
            ids.append(kwargs["job_id"])
    return sorted(ids)


def _apply(consumer, queues: list[str], state: str, why: str | None = None) -> None:
    """Consume the agent's queues when active, none when draining (consumer thread).

    ``why`` names a hold (lease expired, disabled) that stops consuming whatever the
    desired state says."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return
    stop = state == DesiredState.DRAINING or why is not None
    for queue in queues:
        consuming = task_consumer.consuming_from(queue)
        if stop and consuming:
            consumer.cancel_task_queue(queue)
            logger.info("%s: stopped consuming from %s", why or "draining", queue)
        elif not stop and not consuming:
            consumer.add_task_queue(queue)
            logger.info("active: consuming from %s", queue)


def _hold_reason(runtime) -> str | None:
    manager = runtime.lease_manager
    if manager is None or not manager.held:
        return None
    return "disabled" if manager.disabled else "lease expired"


class LeaseStep(bootsteps.StartStopStep):
    """Start the Lease Manager with the worker; keep it through the warm shutdown."""

    requires = {"celery.worker.components:Pool"}
    label = "LeaseManager"

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.manager: LeaseManager | None = None

    def start(self, worker):
        runtime = worker.app.exploop_runtime
        self.worker = worker

        def report() -> dict:
            jobs = running_jobs()
            status = "stopping" if self.stopping() else runtime.status()
            return {"status": status, "running_jobs": jobs, "jobs_running": len(jobs),
                    "max_jobs": runtime.max_jobs, "version": runtime.version,
                    "host": runtime.host, "nodename": worker.hostname}

        def apply_state(state: str) -> None:
            runtime.desired_state = state
            consumer = getattr(worker, "consumer", None)
            if consumer is not None and not self.stopping():
                consumer.call_soon(_apply, consumer, runtime.queues, state, _hold_reason(runtime))

        def on_auth_failure() -> None:
            # The key is refused (agent deleted): its jobs already run elsewhere, so do not let
            # them finish. A cold shutdown kills the pool children, and their scanners die with them.
            if worker_state.should_terminate is None and not runtime.auth_failed:
                logger.error(KEY_REFUSED)
            runtime.auth_failed = True
            os.kill(os.getpid(), signal.SIGQUIT)

        # A pool child whose report was answered 401 asks for the same (workers.tasks.key_refused).
        signal.signal(KEY_REFUSED_SIGNAL, lambda signum, frame: on_auth_failure())

        settings = worker.app.exploop_settings
        memory = MemoryWatch(settings.memory_limit or cgroup_memory_limit(), settings.memory_warn_ratio,
                             runtime.metrics)
        observe = runtime.metrics.heartbeat_latency.observe if runtime.metrics else (lambda s: None)
        self.manager = LeaseManager(runtime.client, runtime.heartbeat_interval, report,
                                    apply_state, on_auth_failure, observe_latency=observe,
                                    after_renewal=memory.check, hold=lambda held: apply_state(runtime.desired_state),
                                    incarnation=runtime.incarnation)
        runtime.lease_manager = self.manager
        self.manager.start()

    @staticmethod
    def stopping() -> bool:
        return worker_state.should_stop is not None or worker_state.should_terminate is not None

    def stop(self, worker):
        # Called as the shutdown begins, before running jobs finish: keep renewing, and
        # announce the stop now so the agent shows "stopping" at once.
        # ``workers.agent`` stops the manager once the worker has exited.
        if self.manager is not None:
            self.manager.wake()


class DesiredStateStep(bootsteps.StartStopStep):
    """Consumer step: a drained agent that restarts must not take a job before its lease says so."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    label = "DesiredState"

    def start(self, consumer):
        runtime = consumer.app.exploop_runtime
        why = _hold_reason(runtime)
        if runtime.desired_state == DesiredState.DRAINING or why is not None:
            _apply(consumer, runtime.queues, "draining", why)


class StallWatchStep(bootsteps.StartStopStep):
    """Consumer step (``sentinel://`` brokers): restart a consumer left behind by a failover.

    After a Sentinel failover, kombu's consumer can stop consuming while the worker lives
    on and keeps renewing its lease (celery/celery#6348, #8030). Two signs, checked every
    ``INTERVAL``:

    * the sentinels name another master than the one named when this consumer (re)started:
      the consumer never reconnected, so it is restarted at once;
    * messages wait on this agent's queues while it is active with free slots, ``STRIKES``
      checks in a row (a stall with no failover seen, or one this step missed).

    Either raises a connection error in the consumer's event loop, and Celery reconnects
    (the sentinels name the new master).
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}
    label = "StallWatch"
    INTERVAL = 2.5
    STRIKES = 6

    def __init__(self, consumer, **kwargs):
        super().__init__(consumer, **kwargs)
        self.strikes = 0
        self.tref = None
        self.broker: Broker | None = None
        self.master: tuple[str, int] | None = None

    def start(self, consumer):
        url = consumer.app.conf.broker_url
        if not str(url).startswith("sentinel://"):
            return
        if self.broker is None:
            options = consumer.app.conf.broker_transport_options
            self.broker = Broker(redis_client(url, options.get("master_name"), socket_timeout=2,
                                              socket_connect_timeout=2),
                                 KeyLayout.from_transport_options(options))
        self.strikes = 0
        self.master = self.current_master()
        self.tref = consumer.timer.call_repeatedly(self.INTERVAL, self.check, (consumer,), priority=10)

    def stop(self, consumer):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def current_master(self) -> tuple[str, int] | None:
        """The master the sentinels name now (None when no sentinel answers)."""
        assert self.broker is not None
        try:
            return tuple(self.broker.client.connection_pool.get_master_address())  # type: ignore[attr-defined]
        except (redis.RedisError, OSError):
            return None

    def check(self, consumer) -> None:
        if self.broker is None:
            return
        master = self.current_master()
        if master is not None and self.master is not None and master != self.master:
            logger.warning("broker master moved from %s:%s to %s:%s; reconnecting the consumer",
                           *self.master, *master)
            self.master = master
            raise redis.exceptions.ConnectionError("broker master moved (Sentinel failover)")
        if self.master is None:
            self.master = master
        runtime = consumer.app.exploop_runtime
        if runtime.desired_state != DesiredState.ACTIVE or len(running_jobs()) >= runtime.max_jobs:
            self.strikes = 0
            return
        try:
            waiting = sum(self.broker.depths(runtime.queues).values())
        except redis.RedisError:
            return  # the broker is unreachable: kombu's own reconnection deals with that
        self.strikes = self.strikes + 1 if waiting else 0
        if self.strikes >= self.STRIKES:
            self.strikes = 0
            logger.warning("consumer stalled: %d messages waiting on %s with free slots; reconnecting",
                           waiting, ",".join(runtime.queues))
            raise redis.exceptions.ConnectionError("consumer stalled after a broker failover")
