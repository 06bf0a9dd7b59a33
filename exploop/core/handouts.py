"""Jobs handed out by ``POST /platform/poll``, claimed within a short window or put back.

A long-poll pops a message from the agent's ``<cap>.<region>`` queues (the same kombu
Redis lists the Celery agents consume) and records a *handout*: hash
``exploop:handouts`` job_id -> JSON {agent, attempt, handout_id, queue, raw} and zset
``exploop:handout-expiry`` job_id -> expiry (Redis server time). The agent must claim
with the handout id before it expires. If the poll's answer was lost (client gone,
proxy dropped it), the controller's ``restore_handouts`` pushes the raw message back at
the consuming end of its queue, attempt unchanged. Claim and restore each delete the
handout in one Lua step, so exactly one of them wins; a late claim is refused.
Handouts live on the broker that holds the queue (the agent's region's broker), so the
Lua scripts that push a message back run where the queue is.
"""
from __future__ import annotations

import json
import secrets

import redis as redis_lib
from flask import current_app

from ..broker import Broker, decode_delivery
from ..config import parse_duration
from .exceptions import ApiError

__all__ = ["HANDOUTS", "EXPIRY", "poll_redis", "pop", "take", "put_back", "restore_expired",
           "handed_out"]

HANDOUTS = "exploop:handouts"
EXPIRY = "exploop:handout-expiry"

# Record a handout; the expiry is computed from Redis' clock so API hosts' clocks do not matter.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return tostring(now + tonumber(ARGV[3]))
"""

# Claim side: delete the handout iff it is this agent's, this handout id, and not expired.
# Returns the stored JSON on success; 'expired' / 'missing' / 'mismatch' otherwise.
_TAKE = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return {0, 'missing'} end
local handout = cjson.decode(value)
if handout['handout_id'] ~= ARGV[2] or handout['agent'] ~= ARGV[3] then return {0, 'mismatch'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expiry = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if expiry == nil or expiry <= now then return {0, 'expired'} end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {1, value}
"""

# Controller side: every expired handout goes back to the consuming (right) end of its
# queue and is deleted, in one step, so a concurrent claim either won before or loses.
_RESTORE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local restored = {}
for _, job_id in ipairs(due) do
  local value = redis.call('HGET', KEYS[1], job_id)
  if value then
    local handout = cjson.decode(value)
    redis.call('RPUSH', handout['queue'], handout['raw'])
    redis.call('HDEL', KEYS[1], job_id)
    table.insert(restored, value)
  end
  redis.call('ZREM', KEYS[2], job_id)
end
return restored
"""


def poll_redis(app, broker: Broker) -> redis_lib.Redis:
    """A client of ``broker`` whose socket timeout outlasts the longest long-poll (BRPOP blocks)."""
    clients = app.extensions.setdefault("redis_poll", {})
    client = clients.get(broker.url)
    if client is None:
        hold = parse_duration(app.config["MAX_POLL_TIMEOUT"], "EXPLOOP_MAX_POLL_TIMEOUT")
        # One connection per held poll (BRPOP blocks it): the pool must hold every poll this
        # process may hold (redis-py's default caps a pool at 100).
        client = broker.connect(socket_timeout=hold + 10, socket_connect_timeout=3, health_check_interval=30,
                                max_connections=int(app.config["MAX_HELD_POLLS"]))
        clients[broker.url] = client
    return client


def pop(agent_name: str, queues: list[str], hold: float, claim_window: float, broker: Broker) -> dict | None:
    """Block up to ``hold`` seconds for a message on ``queues`` of ``broker``; record and return a handout."""
    app = current_app
    client = poll_redis(app, broker)
    keys = broker.layout.consume_order(queues)
    deadline_left = hold
    while True:
        try:
            reply = client.brpop(keys, timeout=max(deadline_left, 0.01))
        except redis_lib.exceptions.MaxConnectionsError:
            raise ApiError(503, "too many polls held by this API process; retry",
                           {"max_held_polls": app.config["MAX_HELD_POLLS"]}, headers={"Retry-After": "1"}) from None
        if reply is None:
            return None
        key, raw = reply
        key = key.decode() if isinstance(key, bytes) else key
        raw = raw.decode() if isinstance(raw, bytes) else raw
        delivery = decode_delivery(raw)
        if delivery is not None:
            break
        # Not a scan message (nothing else is published there): drop it, keep waiting.
        current_app.logger.warning("dropping undecodable message from %s", key)
        deadline_left = 0.01
    job_id, attempt = delivery
    handout_id = secrets.token_urlsafe(16)
    value = json.dumps({"agent": agent_name, "attempt": attempt, "handout_id": handout_id,
                        "queue": key, "raw": raw})
    client.eval(_RECORD, 2, HANDOUTS, EXPIRY, job_id, value, claim_window)
    return {"job_id": job_id, "attempt": attempt, "handout_id": handout_id,
            "claim_within": claim_window, "queue": key}


def take(job_id: str, handout_id: str, agent_name: str, broker: Broker) -> tuple[dict | None, str]:
    """Delete the agent's unexpired handout of ``job_id``; (handout, "") or (None, why)."""
    ok, value = broker.client.eval(_TAKE, 2, HANDOUTS, EXPIRY, job_id, handout_id, agent_name)
    value = value.decode() if isinstance(value, bytes) else value
    if not ok:
        return None, value
    return json.loads(value), ""


def put_back(handout: dict, broker: Broker) -> None:
    """Return a taken handout's message to the consuming end of its queue (claim refused)."""
    broker.client.rpush(handout["queue"], handout["raw"])


def restore_expired(client: redis_lib.Redis, limit: int = 1000) -> list[dict]:
    """Put every expired handout's message back on its queue; return the handouts."""
    values = client.eval(_RESTORE, 2, HANDOUTS, EXPIRY, limit)
    return [json.loads(v) for v in values]


def handed_out(client: redis_lib.Redis) -> set:
    """(job id, attempt) of every outstanding handout (for the controller's queue repair)."""
    present = set()
    for value in client.hvals(HANDOUTS):
        try:
            handout = json.loads(value)
            present.add((handout.get("raw") and decode_delivery(handout["raw"])) or None)
        except ValueError:
            continue
    present.discard(None)
    return present
