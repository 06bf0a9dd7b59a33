"""Agent leases in Redis: ``exploop:lease:<agent>`` with a TTL, renewed by heartbeats.

A lease that is present means the agent is alive; its value is the last body the
agent reported. Nothing here is the only copy of anything: a flushed Redis only
makes agents look offline until their next renewal.
"""
from __future__ import annotations

import json
import time

import redis

__all__ = ["LeaseStore", "LEASE_PREFIX", "IDENTITY_PREFIX", "LAST_RENEWAL_KEY"]

LEASE_PREFIX = "exploop:lease:"
#: Hash agent name -> time of its last renewal (no TTL): ``Last Seen`` of an agent
#: whose lease has gone, exact to the renewal (the database copy lags up to a minute).
LAST_RENEWAL_KEY = "exploop:last-renewal"
#: Agent identity by key hash, cached for the lease hot path (expires, and is
#: deleted whenever the agent record changes; the database stays the truth).
IDENTITY_PREFIX = "exploop:agent-key:"

# One round trip: find the agent by key hash, and renew its lease if found.
_RENEW_BY_KEY = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local name = cjson.decode(raw)['name']
redis.call('SET', ARGV[3] .. name, ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('HSET', ARGV[4], name, ARGV[5])
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
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key(agent), json.dumps(dict(body, renewed_at=now)), ex=max(1, int(round(ttl))))
        pipe.hset(LAST_RENEWAL_KEY, agent, repr(now))
        pipe.execute()

    def renew_by_key(self, key_hash: str, body: dict, ttl: float) -> dict | None:
        """Renew the lease of the cached agent with this key hash; None if not cached."""
        now = time.time()
        value = json.dumps(dict(body, renewed_at=now))
        raw = self._renew_by_key(keys=[IDENTITY_PREFIX + key_hash],
                                 args=[value, max(1, int(round(ttl))), LEASE_PREFIX, LAST_RENEWAL_KEY, repr(now)])
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

    def forget_renewals(self, agent: str) -> None:
        """Drop a deleted agent's last renewal time."""
        self.redis.hdel(LAST_RENEWAL_KEY, agent)

    def read_fleet(self, agents: list[str]) -> tuple[dict[str, dict | None], dict[str, float]]:
        """Leases (with ``ttl``) and last renewal times of many agents, in one round trip."""
        if not agents:
            return {}, {}
        keys = [self.key(name) for name in agents]
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.hmget(LAST_RENEWAL_KEY, agents)
        for key in keys:
            pipe.ttl(key)
        values, renewals, *ttls = pipe.execute()
        leases: dict[str, dict | None] = {}
        for name, raw, ttl in zip(agents, values, ttls, strict=True):
            leases[name] = None if raw is None else dict(json.loads(raw), ttl=max(ttl, 0))
        renewed = {name: float(value) for name, value in zip(agents, renewals, strict=True) if value is not None}
        return leases, renewed

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
