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

__all__ = ["LeaseStore", "LEASE_PREFIX", "IDENTITY_PREFIX", "LAST_RENEWAL_KEY", "RESUMED_KEY",
           "AGENT_RENEWALS_KEY", "DEADLINES"]

LEASE_PREFIX = "exploop:lease:"
#: Agent identity by key hash, cached for the lease hot path (expires, and is
#: deleted whenever the agent record changes; the database stays the truth).
IDENTITY_PREFIX = "exploop:agent-key:"
#: Sorted set agent name -> lease deadline (Redis server time, seconds).
DEADLINES = "exploop:lease-deadlines"

#: When any agent last renewed (epoch seconds), and when renewals last resumed after a
#: fleet-wide silence or a Redis that lost its keys: the controller's "outage, not crash" signal.
LAST_RENEWAL_KEY = "exploop:fleet:last-renewal"
RESUMED_KEY = "exploop:fleet:resumed-at"
#: Hash agent name -> time of its last renewal (no TTL): ``Last Seen`` of an agent
#: whose lease has gone, exact to the renewal (the database copy lags up to a minute).
AGENT_RENEWALS_KEY = "exploop:last-renewal"

# Note a renewal: its deadline (KEYS[#KEYS - 3], by Redis' clock), the agent's own time
# (KEYS[#KEYS - 2], a hash), and fleet-wide: a gap
# longer than ARGV[#ARGV] seconds since the previous renewal (or no previous one: Redis
# lost its keys) means renewals stopped for everyone and now resume.
_TOUCH_FLEET = """
local now, gap = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
redis.call('ZADD', KEYS[#KEYS - 3], tonumber(redis.call('TIME')[1]) + tonumber(ARGV[2]), ARGV[#ARGV - 2])
redis.call('HSET', KEYS[#KEYS - 2], ARGV[#ARGV - 2], ARGV[#ARGV - 1])
local last = redis.call('GET', KEYS[#KEYS - 1])
if (not last) or (now - tonumber(last) > gap) then redis.call('SET', KEYS[#KEYS], ARGV[#ARGV - 1]) end
if (not last) or tonumber(last) < now then redis.call('SET', KEYS[#KEYS - 1], ARGV[#ARGV - 1]) end
"""

# One round trip: find the agent by key hash, and renew its lease if found and held by the
# same incarnation. A lease that is gone, or held by another start of the agent, goes to the
# database path (which requeues a previous incarnation's jobs, and clears a stop).
_RENEW_BY_KEY = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local name = cjson.decode(raw)['name']
local old = redis.call('GET', ARGV[3] .. name)
if not old then return false end
if ARGV[4] ~= '' and cjson.decode(old)['incarnation'] ~= ARGV[4] then return false end
redis.call('SET', ARGV[3] .. name, ARGV[1], 'EX', tonumber(ARGV[2]))
ARGV[#ARGV - 2] = name  -- the agent's name, for its renewal time
""" + _TOUCH_FLEET + """
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

_FLEET_KEYS = [DEADLINES, AGENT_RENEWALS_KEY, LAST_RENEWAL_KEY, RESUMED_KEY]


#: How a stopping agent's lease body starts (see ``LeaseStore._value``).
_STOPPING = json.dumps({"status": "stopping"})[:-1].encode()


class LeaseStore:
    """Read and renew agent leases."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._renew_by_key = client.register_script(_RENEW_BY_KEY)
        self._renew = client.register_script(
            "redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))" + _TOUCH_FLEET)
        self._due = client.register_script(_DUE)
        self._settle = client.register_script(_SETTLE)

    @staticmethod
    def key(agent: str) -> str:
        return LEASE_PREFIX + agent

    @staticmethod
    def _value(body: dict, ttl: float, now: float) -> str:
        # "status" goes first: ``presence`` tells a stopping agent from the stored bytes alone.
        first = {"status": body["status"]} if "status" in body else {}
        return json.dumps({**first, **body, "renewed_at": now, "lease_ttl": max(1, int(round(ttl)))})

    @staticmethod
    def _gap(body: dict) -> float:
        """Silence (seconds) after which a renewal counts as renewals resuming fleet-wide."""
        return 2 * float(body.get("heartbeat_interval") or 30)

    def renew(self, agent: str, body: dict, ttl: float) -> None:
        """Store the agent's report and (re)start its TTL."""
        now = time.time()
        self._renew(keys=[self.key(agent), *_FLEET_KEYS],
                    args=[self._value(body, ttl, now), max(1, int(round(ttl))), agent, now, self._gap(body)])

    def renew_by_key(self, key_hash: str, body: dict, ttl: float) -> dict | None:
        """Renew the lease of the cached agent with this key hash; None if not cached, if the
        lease is gone, or if it was held by another incarnation."""
        now = time.time()
        raw = self._renew_by_key(keys=[IDENTITY_PREFIX + key_hash, *_FLEET_KEYS],
                                 args=[self._value(body, ttl, now), max(1, int(round(ttl))), LEASE_PREFIX,
                                       body.get("incarnation") or "", "", now, self._gap(body)])
        return json.loads(raw) if raw else None

    def fleet_renewals(self) -> tuple[float | None, float | None]:
        """(last renewal by any agent, last time renewals resumed after a fleet-wide silence)."""
        last, resumed = self.redis.mget([LAST_RENEWAL_KEY, RESUMED_KEY])
        return (float(last) if last else None), (float(resumed) if resumed else None)

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
        return set(self.presence(agents))

    def presence(self, agents: list[str]) -> dict[str, bool]:
        """Agents that hold a lease -> whether it says they are stopping (bodies not decoded:
        ``_value`` writes the status first)."""
        alive: dict[str, bool] = {}
        for start in range(0, len(agents), 5000):
            chunk = agents[start:start + 5000]
            for name, raw in zip(chunk, self.redis.mget([self.key(n) for n in chunk]), strict=True):
                if raw is not None:
                    alive[name] = (raw.encode() if isinstance(raw, str) else raw).startswith(_STOPPING)
        return alive

    def last_renewals(self, agents: list[str]) -> dict[str, tuple[float, float]]:
        """(last renewal, lease TTL) of agents whose lease is gone, from the renewal hash and
        the deadline index (deadline minus renewal); absent after a flush."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(AGENT_RENEWALS_KEY, agents)
        pipe.zmscore(DEADLINES, agents)
        renewed, deadlines = pipe.execute()
        found = {}
        for name, at, deadline in zip(agents, renewed, deadlines, strict=True):
            if at is not None:
                found[name] = (float(at), float(deadline) - float(at) if deadline else 0.0)
        return found

    def forget_renewals(self, agent: str) -> None:
        """Drop a deleted agent's last renewal time."""
        self.redis.hdel(AGENT_RENEWALS_KEY, agent)

    def read_fleet(self, agents: list[str]) -> tuple[dict[str, dict | None], dict[str, float]]:
        """Leases (with ``ttl``) and last renewal times of many agents, in one round trip."""
        if not agents:
            return {}, {}
        keys = [self.key(name) for name in agents]
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(keys)
        pipe.hmget(AGENT_RENEWALS_KEY, agents)
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
        leases: dict[str, dict | None] = {}
        for i, (name, raw) in enumerate(zip(agents, values, strict=True)):
            if raw is None:
                leases[name] = None
            else:
                lease = json.loads(raw)
                if with_ttl:
                    lease["ttl"] = max(ttls[i], 0)
                leases[name] = lease
        return leases
