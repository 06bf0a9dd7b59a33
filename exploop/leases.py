"""Agent leases in Redis: ``exploop:lease:<agent>`` with a TTL, renewed by heartbeats.

A lease that is present means the agent is alive; its value is the last body the
agent reported. Nothing here is the only copy of anything: a flushed Redis only
makes agents look offline until their next renewal.
"""
from __future__ import annotations

import json
import time

import redis

__all__ = ["LeaseStore", "LEASE_PREFIX"]

LEASE_PREFIX = "exploop:lease:"


class LeaseStore:
    """Read and renew agent leases."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    @staticmethod
    def key(agent: str) -> str:
        return LEASE_PREFIX + agent

    def renew(self, agent: str, body: dict, ttl: float) -> None:
        """Store the agent's report and (re)start its TTL."""
        value = dict(body, renewed_at=time.time())
        self.redis.set(self.key(agent), json.dumps(value), ex=max(1, int(round(ttl))))

    def release(self, agent: str) -> None:
        """Drop a lease at once (graceful stop, deleted agent)."""
        self.redis.delete(self.key(agent))

    def get(self, agent: str) -> dict | None:
        """Return the lease body with its remaining ``ttl``, or None when expired."""
        return self.get_many([agent])[agent]

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
