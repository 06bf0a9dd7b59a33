"""Agent leases in Redis: ``exploop:lease:<agent>`` with a TTL, renewed by heartbeats.

A lease that is present means the agent is alive; its value is the last body the
agent reported. Nothing here is the only copy of anything: a flushed Redis only
makes agents look offline until their next renewal.
"""
from __future__ import annotations

import json
import time

import redis

__all__ = ["LeaseStore", "LEASE_PREFIX", "IDENTITY_PREFIX"]

LEASE_PREFIX = "exploop:lease:"
#: Agent identity by key hash, cached for the lease hot path (expires, and is
#: deleted whenever the agent record changes; the database stays the truth).
IDENTITY_PREFIX = "exploop:agent-key:"

# One round trip: find the agent by key hash, and renew its lease if found.
_RENEW_BY_KEY = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local name = cjson.decode(raw)['name']
redis.call('SET', ARGV[3] .. name, ARGV[1], 'EX', tonumber(ARGV[2]))
return raw
"""


class LeaseStore:
    """Read and renew agent leases."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._renew_by_key = client.register_script(_RENEW_BY_KEY)

    @staticmethod
    def key(agent: str) -> str:
        return LEASE_PREFIX + agent

    def renew(self, agent: str, body: dict, ttl: float) -> None:
        """Store the agent's report and (re)start its TTL."""
        value = dict(body, renewed_at=time.time())
        self.redis.set(self.key(agent), json.dumps(value), ex=max(1, int(round(ttl))))

    def renew_by_key(self, key_hash: str, body: dict, ttl: float) -> dict | None:
        """Renew the lease of the cached agent with this key hash; None if not cached."""
        value = json.dumps(dict(body, renewed_at=time.time()))
        raw = self._renew_by_key(keys=[IDENTITY_PREFIX + key_hash],
                                 args=[value, max(1, int(round(ttl))), LEASE_PREFIX])
        return json.loads(raw) if raw else None

    def remember(self, key_hash: str, identity: dict, ttl: float) -> None:
        """Cache an agent's identity for ``renew_by_key``."""
        self.redis.set(IDENTITY_PREFIX + key_hash, json.dumps(identity), ex=max(1, int(ttl)))

    def forget(self, key_hash: str) -> None:
        """Drop a cached identity: the next renewal reads the database."""
        self.redis.delete(IDENTITY_PREFIX + key_hash)

    def release(self, agent: str) -> None:
        """Drop a lease at once (graceful stop, deleted agent)."""
        self.redis.delete(self.key(agent))

    def get(self, agent: str) -> dict | None:
        """Return the lease body with its remaining ``ttl``, or None when expired."""
        return self.get_many([agent])[agent]

    def live(self, agents: list[str]) -> set[str]:
        """Names of the agents that hold a lease (one MGET; the bodies are not decoded)."""
        if not agents:
            return set()
        values = self.redis.mget([self.key(name) for name in agents])
        return {name for name, raw in zip(agents, values, strict=True) if raw is not None}

    def get_many(self, agents: list[str], with_ttl: bool = True) -> dict[str, dict | None]:
        """Fetch many leases in one pipelined round trip (``with_ttl=False``: one MGET)."""
        if not agents:
            return {}
        keys = [self.key(name) for name in agents]
        pipe = self.redis.pipeline(transaction=False)
        # One MGET for the bodies instead of a GET per agent: half the commands to
        # encode and parse, which is most of the cost for a page of 500 agents.
        pipe.mget(keys)
        if with_ttl:
            for key in keys:
                pipe.ttl(key)
        values, *ttls = pipe.execute()
        leases = {}
        for i, (name, raw) in enumerate(zip(agents, values)):
            if raw is None:
                leases[name] = None
            else:
                lease = json.loads(raw)
                if with_ttl:
                    lease["ttl"] = max(ttls[i], 0)
                leases[name] = lease
        return leases
