"""Worker bootsteps: the Lease Manager, and the desired state applied before consuming."""
from __future__ import annotations

import logging
import os
import signal

from celery import bootsteps
from celery.worker import state as worker_state

from .lease import LeaseManager
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


def _apply(consumer, queues: list[str], state: str) -> None:
    """Consume the agent's queues when active, none when draining (consumer thread)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return
    for queue in queues:
        consuming = task_consumer.consuming_from(queue)
        if state == "draining" and consuming:
            consumer.cancel_task_queue(queue)
            logger.info("draining: stopped consuming from %s", queue)
        elif state == "active" and not consuming:
            consumer.add_task_queue(queue)
            logger.info("active: consuming from %s", queue)


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
            status = "stopping" if worker_state.should_stop is not None or \
                worker_state.should_terminate is not None else runtime.status()
            return {"status": status, "running_jobs": jobs, "jobs_running": len(jobs),
                    "max_jobs": runtime.max_jobs, "version": runtime.version,
                    "host": runtime.host, "nodename": worker.hostname}

        def apply_state(state: str) -> None:
            runtime.desired_state = state
            consumer = getattr(worker, "consumer", None)
            if consumer is not None and worker_state.should_stop is None:
                consumer.call_soon(_apply, consumer, runtime.queues, state)

        def on_auth_failure() -> None:
            runtime.auth_failed = True
            os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown; main exits non-zero

        settings = worker.app.exploop_settings
        memory = MemoryWatch(settings.memory_limit or cgroup_memory_limit(), settings.memory_warn_ratio,
                             runtime.metrics)
        observe = runtime.metrics.heartbeat_latency.observe if runtime.metrics else (lambda s: None)
        self.manager = LeaseManager(runtime.client, runtime.heartbeat_interval, report,
                                    apply_state, on_auth_failure, observe_latency=observe,
                                    after_renewal=memory.check)
        runtime.lease_manager = self.manager
        self.manager.start()

    def stop(self, worker):
        # Called as the shutdown begins, before running jobs finish: keep renewing.
        # ``workers.agent`` stops the manager once the worker has exited.
        pass


class DesiredStateStep(bootsteps.StartStopStep):
    """Consumer step: a drained agent that restarts must not take a job before its lease says so."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    label = "DesiredState"

    def start(self, consumer):
        runtime = consumer.app.exploop_runtime
        if runtime.desired_state == "draining":
            _apply(consumer, runtime.queues, "draining")


class StallWatchStep(bootsteps.StartStopStep):
    """Consumer step (``sentinel://`` brokers): restart a consumer that stopped taking messages.

    After a Sentinel failover, kombu's consumer can stop consuming while the worker lives
    on and keeps renewing its lease (celery/celery#6348, #8030). The sign: messages wait on
    this agent's queues while it is active with free slots. ``STRIKES`` checks in a row like
    that raise a connection error in the consumer's event loop, and Celery reconnects (the
    sentinels name the new master).
    """

    requires = {"celery.worker.consumer.tasks:Tasks"}
    label = "StallWatch"
    INTERVAL = 5.0
    STRIKES = 3

    def __init__(self, consumer, **kwargs):
        super().__init__(consumer, **kwargs)
        self.strikes = 0
        self.tref = None
        self.broker = None

    def start(self, consumer):
        url = consumer.app.conf.broker_url
        if not str(url).startswith("sentinel://"):
            return
        if self.broker is None:
            from exploop.broker import Broker, KeyLayout, redis_client
            options = consumer.app.conf.broker_transport_options
            self.broker = Broker(redis_client(url, options.get("master_name"), socket_timeout=2,
                                              socket_connect_timeout=2),
                                 KeyLayout.from_transport_options(options))
        self.strikes = 0
        self.tref = consumer.timer.call_repeatedly(self.INTERVAL, self.check, (consumer,), priority=10)

    def stop(self, consumer):
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    def check(self, consumer) -> None:
        import redis

        runtime = consumer.app.exploop_runtime
        if runtime.desired_state != "active" or len(running_jobs()) >= runtime.max_jobs:
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
