"""Where kombu's Redis transport keeps our queues: the one home of the broker's key layout.

kombu stores a queue as one Redis list per priority step (``<queue>``, then
``<queue><sep><step>`` for each non-zero step), keeps delivered-but-unacknowledged
messages in a hash, and prefixes every key with the transport's ``global_keyprefix``.
The layout is read from kombu's own ``Channel`` defaults and the app's
``broker_transport_options``, so a prefix or custom priority steps set by an operator
change queue depths, queue repair and HTTP polling together with the Celery side.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis as redis_lib
from kombu.transport.redis import PRIORITY_STEPS, Channel

__all__ = ["KeyLayout", "Broker", "decode_delivery"]

Delivery = tuple[str, int]


@dataclass(frozen=True)
class KeyLayout:
    """The Redis keys of kombu's Redis transport for given transport options."""

    prefix: str = ""
    sep: str = Channel.sep
    priority_steps: tuple[int, ...] = tuple(PRIORITY_STEPS)
    unacked: str = Channel.unacked_key

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any] | None) -> KeyLayout:
        """The layout kombu uses for these ``broker_transport_options``."""
        options = options or {}
        return cls(prefix=options.get("global_keyprefix") or "",
                   sep=options.get("sep", Channel.sep),
                   priority_steps=tuple(options.get("priority_steps", PRIORITY_STEPS)),
                   unacked=options.get("unacked_key", Channel.unacked_key))

    def lists(self, queue: str) -> list[str]:
        """Every Redis list holding ``queue``'s messages, one per priority step."""
        return [self.prefix + (f"{queue}{self.sep}{step}" if step else queue) for step in self.priority_steps]

    def consume_order(self, queues: Iterable[str]) -> list[str]:
        """Keys for BRPOP in kombu's own order: each priority step across all queues."""
        queues = list(queues)
        return [self.prefix + (f"{queue}{self.sep}{step}" if step else queue)
                for step in self.priority_steps for queue in queues]

    @property
    def unacked_key(self) -> str:
        """The hash of messages delivered to a worker and not yet acknowledged."""
        return self.prefix + self.unacked


def decode_delivery(raw: bytes | str) -> Delivery | None:
    """(job id, attempt) of a scan message as kombu stores it, or None if it is not one."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return kwargs["job_id"], int(kwargs["attempt"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Broker:
    """Read access to the broker's Redis: queue depths and which deliveries it holds."""

    def __init__(self, client: redis_lib.Redis, layout: KeyLayout):
        self.client = client
        self.layout = layout

    def depths(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages waiting in each queue (one pipelined round trip)."""
        names = sorted(queues)
        step = len(self.layout.priority_steps)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for key in self.layout.lists(name):
                pipe.llen(key)
        replies = pipe.execute()
        return {name: sum(replies[i * step:(i + 1) * step]) for i, name in enumerate(names)}

    def deliveries(self, queues: Iterable[str]) -> set[Delivery]:
        """Every (job id, attempt) waiting in ``queues`` or delivered and not yet acknowledged."""
        present: set[Delivery | None] = set()
        for queue in queues:
            for key in self.layout.lists(queue):
                present.update(decode_delivery(raw) for raw in self.client.lrange(key, 0, -1))
        present.update(decode_delivery(raw) for raw in self.client.hvals(self.layout.unacked_key))
        present.discard(None)
        return present  # type: ignore[return-value]
