"""Where kombu's Redis transport keeps our queues: the one home of the broker's key layout.

kombu stores a queue as one Redis list per priority step (``<queue>``, then
``<queue><sep><step>`` for each non-zero step), keeps delivered-but-unacknowledged
messages in a hash, and prefixes every key with the transport's ``global_keyprefix``.
The layout is read from kombu's own ``Channel`` defaults and the app's
``broker_transport_options``, so a prefix or custom priority steps set by an operator
change queue depths, queue repair and HTTP polling together with the Celery side.

Where the broker is: ``redis_client`` connects to a ``redis://`` URL or, through
Redis Sentinel, to a ``sentinel://h1:26379;sentinel://h2:26379`` URL (kombu's own
form) and a master name, so the API's Redis clients follow a failover the way
kombu's ``sentinel://`` transport does for Celery. ``Brokers`` maps each region to
its broker (``REGION_BROKERS``; by default every region shares one).
"""
from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis as redis_lib
from kombu.transport.redis import PRIORITY_STEPS, Channel
from redis.sentinel import Sentinel

from .routing import parse_queue

__all__ = ["KeyLayout", "Broker", "Brokers", "decode_delivery", "redis_client", "is_sentinel",
           "parse_region_brokers", "redact"]

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

    def _list(self, queue: str, step: int) -> str:
        return self.prefix + (f"{queue}{self.sep}{step}" if step else queue)

    def lists(self, queue: str) -> list[str]:
        """Every Redis list holding ``queue``'s messages, one per priority step."""
        return [self._list(queue, step) for step in self.priority_steps]

    def consume_order(self, queues: Iterable[str]) -> list[str]:
        """Keys for BRPOP in kombu's own order: each priority step across all queues."""
        queues = list(queues)
        return [self._list(queue, step) for step in self.priority_steps for queue in queues]

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


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def _sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``sentinel://[:pw@]h1:26379[/db];sentinel://h2:26379`` -> nodes and the master's options."""
    nodes: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        parsed = urlsplit(part)
        if parsed.scheme != "sentinel" or not parsed.hostname:
            raise ValueError(f"invalid Sentinel URL part {part!r} (expected sentinel://host:port)")
        nodes.append((parsed.hostname, parsed.port or 26379))
        if parsed.password:
            options["password"] = unquote(parsed.password)
        if parsed.path.strip("/"):
            options["db"] = int(parsed.path.strip("/"))
    if not nodes:
        raise ValueError(f"invalid Sentinel URL {url!r}")
    return nodes, options


def redis_client(url: str, master_name: str | None = None, **kwargs: Any) -> redis_lib.Redis:
    """A Redis client for ``url``; for a ``sentinel://`` URL, one that follows ``master_name``.

    The Sentinel client asks the sentinels for the current master on every new
    connection, so after a failover the next command reaches the new master.
    """
    if not is_sentinel(url):
        return redis_lib.Redis.from_url(url, **kwargs)
    if not master_name:
        raise ValueError(f"a Sentinel URL needs a master name (EXPLOOP_SENTINEL_MASTER_NAME): {redact(url)}")
    nodes, options = _sentinel_nodes(url)
    timeouts = {k: kwargs[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kwargs}
    sentinel = Sentinel(nodes, sentinel_kwargs=dict(timeouts), **options)
    return sentinel.master_for(master_name, **kwargs)


def redact(url: str) -> str:
    """The URL without its password, for logs and cluster-info."""
    parts = []
    for part in url.split(";"):
        parsed = urlsplit(part)
        if parsed.password:
            netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
            part = parsed._replace(netloc=netloc).geturl()
        parts.append(part)
    return ";".join(parts)


def parse_region_brokers(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """``REGION_BROKERS``: ``region=url,region=url`` (or a JSON object) -> {region: url}."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            if not item.strip():
                continue
            region, sep, url = item.partition("=")
            if not sep or not region.strip() or not url.strip():
                raise ValueError(f"EXPLOOP_REGION_BROKERS: expected region=url, got {item.strip()!r}")
            pairs.append((region.strip(), url.strip()))
    brokers = {}
    for region, url in pairs:
        if not str(url).startswith(("redis://", "rediss://", "sentinel://", "unix://")):
            raise ValueError(f"EXPLOOP_REGION_BROKERS: region {region!r}: not a Redis URL: {redact(str(url))!r}")
        brokers[str(region)] = str(url)
    return brokers


class Broker:
    """One broker Redis: its URL, client, kombu key layout and the Celery app publishing to it."""

    def __init__(self, client: redis_lib.Redis, layout: KeyLayout, url: str = "",
                 celery: Any = None, master_name: str | None = None):
        self.client = client
        self.layout = layout
        self.url = url
        self.celery = celery
        self.master_name = master_name

    def connect(self, **kwargs: Any) -> redis_lib.Redis:
        """A new client of this broker (e.g. one whose timeout outlasts a blocking pop)."""
        return redis_client(self.url, self.master_name, **kwargs)

    def depths(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages waiting in each queue (one pipelined round trip)."""
        return self.backlog(queues)[0]

    def backlog(self, queues: Iterable[str], hashes: Iterable[str] = ()) -> tuple[dict[str, int], int]:
        """Messages waiting in each queue, and the entries of ``hashes`` (e.g. the unacked
        hash: messages out of any queue but not yet done), in one pipelined round trip."""
        names = sorted(queues)
        hashes = list(hashes)
        step = len(self.layout.priority_steps)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            for key in self.layout.lists(name):
                pipe.llen(key)
        for key in hashes:
            pipe.hlen(key)
        replies = pipe.execute()
        depths = {name: sum(replies[i * step:(i + 1) * step]) for i, name in enumerate(names)}
        return depths, sum(replies[len(names) * step:])

    def deliveries(self, queues: Iterable[str]) -> set[Delivery]:
        """Every (job id, attempt) waiting in ``queues`` (``unacked`` has the delivered ones)."""
        present: set[Delivery | None] = set()
        for queue in queues:
            for key in self.layout.lists(queue):
                present.update(decode_delivery(raw) for raw in self.client.lrange(key, 0, -1))
        present.discard(None)
        return present  # type: ignore[return-value]

    def unacked(self) -> set[Delivery]:
        """(job id, attempt) of every message delivered to a Celery worker and not yet acknowledged."""
        found = {decode_delivery(raw) for raw in self.client.hvals(self.layout.unacked_key)}
        found.discard(None)
        return found  # type: ignore[return-value]


@dataclass
class Brokers:
    """Each region's broker; regions not named in REGION_BROKERS use the default one."""

    default: Broker
    by_region: dict[str, Broker] = field(default_factory=dict)

    def for_region(self, region: str) -> Broker:
        return self.by_region.get(region, self.default)

    def all(self) -> list[Broker]:
        """Every distinct broker, the default first."""
        seen, brokers = set(), []
        for broker in (self.default, *self.by_region.values()):
            if id(broker) not in seen:
                seen.add(id(broker))
                brokers.append(broker)
        return brokers

    def depths(self, queues: Iterable[str]) -> dict[str, int | None]:
        """Messages waiting in each ``<cap>.<region>`` queue, read from its region's broker
        (None for the queues of a broker that cannot be reached)."""
        depths: dict[str, int | None] = {}
        for broker, names in self.group_queues(queues):
            try:
                depths.update(broker.depths(names))
            except redis_lib.RedisError:
                depths.update({name: None for name in names})
        return dict(sorted(depths.items()))

    def health(self, regions: Iterable[str], known: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Each broker (default first): its URL without password, the regions it carries, ok or the error.

        ``known``: URL -> status already found (a ping the caller just made), not pinged again.
        """
        regions = set(regions) | set(self.by_region)
        report = {}
        for broker in self.all():
            carried = sorted(r for r in regions if self.for_region(r) is broker)
            status = (known or {}).get(broker.url)
            if status is None:
                try:
                    broker.client.ping()
                    status = "ok"
                except redis_lib.RedisError as exc:
                    status = f"error: {exc.__class__.__name__}"
            name = "default" if broker is self.default else ",".join(carried)
            report[name] = {"url": redact(broker.url), "regions": carried, "status": status}
        return report

    def group_queues(self, queues: Iterable[str]) -> list[tuple[Broker, list[str]]]:
        """Group ``<cap>.<region>`` queues (sorted) by the broker that holds them."""
        groups: dict[int, tuple[Broker, list[str]]] = {}
        for queue in sorted(set(queues)):
            broker = self.for_region(parse_queue(queue)[1])
            groups.setdefault(id(broker), (broker, []))[1].append(queue)
        return list(groups.values())
