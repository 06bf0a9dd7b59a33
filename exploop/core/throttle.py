"""Brute-force protection: failed authentications counted per client and credential kind.

Only failures are counted (``exploop:authfail:<kind>:<client>``, one atomic
INCR + EXPIRE in Lua): a request with a valid credential never touches Redis here
and is never refused, so a fleet of healthy agents behind one NAT address is never
throttled however fast it renews its leases. After ``limit`` failures within
``window`` seconds the key's lifetime becomes ``block`` seconds, and each further
failure is answered 429 with the remaining lifetime as Retry-After. Failures
during the block do not extend it: a client that keeps failing gets ``limit``
answers per ``block`` seconds, then 429s.
"""
from __future__ import annotations

import logging

import redis

__all__ = ["AuthThrottle", "FAILURE_PREFIX", "KINDS"]

logger = logging.getLogger(__name__)

FAILURE_PREFIX = "exploop:authfail:"
#: Credential kinds, counted separately: a client failing tenant keys is not
#: refused as an agent (and the reverse).
KINDS = ("agent", "tenant", "admin", "bootstrap")

# KEYS[1] counter; ARGV: window, limit, block. Returns {failures, retry_after or -1}.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
local limit = tonumber(ARGV[2])
if n == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
if n == limit then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
if n > limit then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl < 1 then
    -- a counter without expiry must not block forever
    redis.call('EXPIRE', KEYS[1], ARGV[3])
    ttl = tonumber(ARGV[3])
  end
  return {n, ttl}
end
return {n, -1}
"""


class AuthThrottle:
    """Count failed authentications; say when a client must wait."""

    def __init__(self, client: redis.Redis, limit: int, window: int, block: int):
        self.redis = client
        self.limit, self.window, self.block = limit, window, block
        self._fail = client.register_script(_FAIL)

    @staticmethod
    def key(kind: str, client_id: str) -> str:
        return f"{FAILURE_PREFIX}{kind}:{client_id}"

    def failed(self, kind: str, client_id: str) -> int | None:
        """Record one failure; return seconds to wait when over the limit, else None.

        Redis being down must not turn every bad credential into a 500 (nor let the
        caller through): the failure is answered as a plain 401, uncounted.
        """
        try:
            failures, retry_after = self._fail(keys=[self.key(kind, client_id)],
                                               args=[self.window, self.limit, self.block])
        except redis.RedisError as exc:
            logger.warning("could not count authentication failure kind=%s remote=%s: %s",
                           kind, client_id, exc)
            return None
        if failures == self.limit:
            logger.warning("authentication failures over limit kind=%s remote=%s failures=%d"
                           " blocked_for=%ds", kind, client_id, failures, self.block)
        return int(retry_after) if retry_after > 0 else None
