"""The Celery app both the API (publisher) and the agents (consumers) use."""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from .routing import route_task

__all__ = ["make_celery", "declare_queue"]


def make_celery(broker_url: str, *, queues=(), visibility_timeout: float = 7200,
                overrides: dict | None = None) -> Celery:
    """Create the Celery app that publishes and consumes scan jobs.

    ``visibility_timeout`` must exceed the longest job time limit: Redis
    redelivers an unacknowledged message after it, so a shorter one runs long
    scans twice.
    """
    app = Celery("exploop", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": int(visibility_timeout)},
        task_routes=(route_task,),
        task_queues=[Queue(name, routing_key=name) for name in queues],
        # A typo in a region must be an error, not a queue nobody consumes.
        task_create_missing_queues=False,
        # Ack after the job ran and take one message at a time: without both, a
        # drained worker still runs every task it had prefetched.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_enable_remote_control=True,
    )
    if overrides:
        overrides = dict(overrides)
        # Merge transport options (e.g. global_keyprefix) instead of dropping visibility_timeout.
        transport = {**app.conf.broker_transport_options, **overrides.pop("broker_transport_options", {})}
        app.conf.update(overrides, broker_transport_options=transport)
    return app


def declare_queue(app: Celery, name: str) -> None:
    """Add a validated queue to the app's declared queues (idempotent)."""
    if name not in app.amqp.queues:
        app.amqp.queues.add(Queue(name, routing_key=name))
