"""Admin console sessions: server-side, in Redis, keyed by a random id in a cookie.

The cookie holds only the session id (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over
HTTPS, path ``/ui/``); Redis holds the admin token's id and the session's CSRF token under
the id's hash, with the idle timeout as TTL, renewed by every request. Nothing in the
session is trusted beyond a request: the token record is read each time, so a revoked
token signs its sessions out on their next request.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets

import redis
from flask import request
from werkzeug.wrappers import Response

__all__ = ["SessionStore", "COOKIE", "LOGIN_COOKIE", "SECURITY_HEADERS", "set_cookie", "clear_cookie",
           "same_token"]

#: Cookie names: the session id, and the sign-in form's one-off CSRF token.
COOKIE = "exploop_console"
LOGIN_COOKIE = "exploop_console_login"
SESSION_PREFIX = "exploop:console:session:"

#: Sent with every console response. No inline script or style anywhere in the console,
#: so the policy needs no 'unsafe-inline'; nothing is loaded from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def _key(session_id: str) -> str:
    # The id is a bearer secret: Redis holds only its hash, like every other credential.
    return SESSION_PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """Create, read (renewing the idle timeout), update and end console sessions."""

    def __init__(self, client: redis.Redis, idle_timeout: int):
        self.redis = client
        self.idle_timeout = max(1, idle_timeout)

    def create(self, token_id: int) -> tuple[str, dict]:
        """A new session for an admin token; returns its id (for the cookie) and data."""
        session_id = secrets.token_urlsafe(32)
        data = {"token_id": token_id, "csrf": secrets.token_urlsafe(32)}
        self.redis.set(_key(session_id), json.dumps(data), ex=self.idle_timeout)
        return session_id, data

    def load(self, session_id: str | None) -> dict | None:
        """The session's data, renewing its idle timeout; None if unknown or expired."""
        if not session_id or len(session_id) > 100:
            return None
        raw = self.redis.getex(_key(session_id), ex=self.idle_timeout)
        return json.loads(raw) if raw else None

    def save(self, session_id: str, data: dict) -> None:
        """Store changed data (a notice for the next page), keeping the idle timeout."""
        self.redis.set(_key(session_id), json.dumps(data), ex=self.idle_timeout, xx=True)

    def end(self, session_id: str | None) -> None:
        """Sign out: the id is worthless from now on."""
        if session_id:
            self.redis.delete(_key(session_id))


def same_token(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison of a submitted CSRF token with the expected one."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def set_cookie(response: Response, name: str, value: str, path: str, max_age: int | None = None) -> None:
    """Set a console cookie: HttpOnly, SameSite=Strict, Secure when the request came over HTTPS."""
    response.set_cookie(name, value, path=path, max_age=max_age, httponly=True, samesite="Strict",
                        secure=request.is_secure)


def clear_cookie(response: Response, name: str, path: str) -> None:
    """Remove a console cookie."""
    response.delete_cookie(name, path=path, httponly=True, samesite="Strict", secure=request.is_secure)
