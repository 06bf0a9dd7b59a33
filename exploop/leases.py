"""Agent leases in Redis: ``exploop:lease:<agent>`` with a TTL, renewed by heartbeats.

A lease that is present means the agent is alive; its value is the last body the
agent reported. Every renewal also records the lease's deadline in the sorted set
``exploop:lease-deadlines`` (agent -> Redis time when the TTL runs out), so the
controller finds the leases that may have expired without reading the whole fleet.
Nothing here is the only copy of anything: a flushed Redis only makes agents look
offline until their next renewal (the controller's periodic full check covers an
index lost with it).
"""
from __future__ import annotations

import json
import time

import redis

__all__ = ["LeaseStore", "LEASE_PREFIX", "IDENTITY_PREFIX", "DEADLINES"]

LEASE_PREFIX = "exploop:lease:"
#: Sorted set agent name -> lease deadline (Redis server time, seconds).
DEADLINES = "exploop:lease-deadlines"
#: Agent identity by key hash, cached for the lease hot path (expires, and is
#: deleted whenever the agent record changes; the database stays the truth).
IDENTITY_PREFIX = "exploop:agent-key:"

# Renew a lease and move its deadline in one step; the deadline uses Redis' clock.
_RENEW = """
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[2]), ARGV[3])
"""

# One round trip: find the agent by key hash, and renew its lease if found.
_RENEW_BY_KEY = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local name = cjson.decode(raw)['name']
local t = redis.call('TIME')
redis.call('SET', ARGV[3] .. name, ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(ARGV[2]), name)
return raw
"""

# Agents whose deadline passed (Redis time), at most ARGV[1] of them.
_DUE = """
local t = redis.call('TIME')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]), 'LIMIT', 0, tonumber(ARGV[1]))
"""

# Drop agents from the index unless a renewal moved their deadline into the future meanwhile.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local removed = 0
for _, name in ipairs(ARGV) do
  local deadline = redis.call('ZSCORE', KEYS[1], name)
  if deadline and tonumber(deadline) <= now then
    redis.call('ZREM', KEYS[1], name)
    removed = removed + 1
  end
end
return removed
"""


class LeaseStore:
    """Read and renew agent leases."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._renew = client.register_script(_RENEW)
        self._renew_by_key = client.register_script(_RENEW_BY_KEY)
        self._due = client.register_script(_DUE)
        self._settle = client.register_script(_SETTLE)

    @staticmethod
    def key(agent: str) -> str:
        return LEASE_PREFIX + agent

    def renew(self, agent: str, body: dict, ttl: float) -> None:
        """Store the agent's report and (re)start its TTL."""
        value = dict(body, renewed_at=time.time())
        self._renew(keys=[self.key(agent), DEADLINES], args=[json.dumps(value), max(1, int(round(ttl))), agent])

    def renew_by_key(self, key_hash: str, body: dict, ttl: float) -> dict | None:
        """Renew the lease of the cached agent with this key hash; None if not cached."""
        value = json.dumps(dict(body, renewed_at=time.time()))
        raw = self._renew_by_key(keys=[IDENTITY_PREFIX + key_hash, DEADLINES],
                                 args=[value, max(1, int(round(ttl))), LEASE_PREFIX])
        return json.loads(raw) if raw else None

    def remember(self, key_hash: str, identity: dict, ttl: float) -> None:
        """Cache an agent's identity for ``renew_by_key``."""
        self.redis.set(IDENTITY_PREFIX + key_hash, json.dumps(identity), ex=max(1, int(ttl)))

    def forget(self, key_hash: str) -> None:
        """Drop a cached identity: the next renewal reads the database."""
        self.redis.delete(IDENTITY_PREFIX + key_hash)

    def release(self, agent: str) -> None:
        """Drop a lease at once (graceful stop, deleted agent); the controller sees it next tick."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.key(agent))
        pipe.zadd(DEADLINES, {agent: 0})
        pipe.execute()

    def due(self, limit: int = 10000) -> list[str]:
        """Agents whose lease deadline has passed: the candidates for lease expiry."""
        return [n.decode() if isinstance(n, bytes) else n for n in self._due(keys=[DEADLINES], args=[limit])]

    def settle(self, agents: list[str]) -> int:
        """Take handled agents out of the deadline index (kept if renewed since)."""
        return int(self._settle(keys=[DEADLINES], args=list(agents))) if agents else 0

    def present(self, agents: list[str]) -> set[str]:
        """The agents that hold a lease (one MGET per 5,000, bodies not decoded)."""
        alive: set[str] = set()
        for start in range(0, len(agents), 5000):
            chunk = agents[start:start + 5000]
            alive.update(name for name, raw in zip(chunk, self.redis.mget([self.key(n) for n in chunk]),
                                                   strict=True) if raw is not None)
        return alive

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
