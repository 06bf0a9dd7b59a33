"""Credentials: random tokens with recognisable prefixes, stored only as hashes.

Tokens carry 256 bits of randomness, so a plain SHA-256 is enough to store them
(no password stretching needed); lookups go by hash, and the final comparison is
constant-time.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

__all__ = ["new_token", "hash_token", "matches", "AGENT_PREFIX", "TENANT_PREFIX",
           "ADMIN_PREFIX", "BOOTSTRAP_PREFIX", "JOB_PREFIX", "mask", "redact_url", "security_event"]

logger = logging.getLogger("exploop.security")

AGENT_PREFIX = "ragent_"
TENANT_PREFIX = "rtenant_"
ADMIN_PREFIX = "radmin_"
BOOTSTRAP_PREFIX = "rboot_"
JOB_PREFIX = "rjob_"


def new_token(prefix: str) -> str:
    """Return a new random credential such as ``ragent_3kJ...``."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Return the stored form of a credential."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def matches(token: str, stored_hash: str) -> bool:
    """Compare a presented credential with a stored hash in constant time."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def mask(value: str, keep: int = 4) -> str:
    """Masked preview of a secret: the first characters, then asterisks."""
    keep = min(keep, len(value) // 4)
    return value[:keep] + "*" * max(4, len(value) - keep)


def security_event(kind: str, audience: str, detail: str = "") -> None:
    """Count and log a security event: ``auth_failed``, ``access_denied`` or ``invalid_token``."""
    from .metrics import SECURITY_EVENTS
    SECURITY_EVENTS.labels(kind, audience).inc()
    logger.warning("security event kind=%s audience=%s %s", kind, audience, detail)


_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # up to the last @ of the authority, as git reads it


def redact_url(url: str) -> str:
    """Hide credentials in a URL (``https://user:token@host/...`` -> ``https://***@host/...``)."""
    return _USERINFO.sub("***@", url)
