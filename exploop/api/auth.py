"""Credential checks, one per audience: agents, tenants, admins.

Each credential is a bearer token with its own prefix; the stored hash is looked
up by index and compared in constant time. A disabled or deleted agent's key
stops working on its next request, because every request reads the record.

A failure is counted per client address and credential kind (exploop.core.throttle):
past the limit it is answered 429 with Retry-After instead of 401. A valid
credential is never refused, whatever its address has failed before.

Each decorator also documents itself in /openapi.json: its security scheme, 401
and 429 (and 403 where a role is needed).
"""
from __future__ import annotations

import functools
import logging

from flask import current_app, g, request
from sqlalchemy import select

from ..core.exceptions import ApiError
from ..core.extensions import db
from ..core.fleet import audit
from ..core.models import AdminToken, Agent, Tenant
from ..core.security import hash_token, matches, security_event
from . import document

logger = logging.getLogger(__name__)

__all__ = ["agent_required", "tenant_required", "admin_required", "bearer_token",
           "auth_failure", "documented_auth", "authenticate", "find_admin_token", "refuse_credential", "SCHEMES"]

#: OpenAPI security scheme per credential kind (all bearer tokens, told apart by prefix).
SCHEMES = {"agent": "agentKey", "tenant": "tenantKey", "admin": "adminToken"}


def bearer_token() -> str | None:
    """Return the token of an ``Authorization: Bearer <token>`` header."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _lookup(model, token: str | None, prefix: str):
    if not token or not token.startswith(prefix):
        return None
    record = db.session.scalar(select(model).where(model.__table__.c[_HASH[model]] == hash_token(token)))
    if record is None or not matches(token, getattr(record, _HASH[model])):
        return None
    return record


_HASH = {Agent: "key_hash", Tenant: "key_hash", AdminToken: "token_hash"}


def auth_failure(kind: str, error: ApiError) -> ApiError:
    """Count a failed authentication of ``kind``; return ``error`` or, over the limit, a 429."""
    retry_after = current_app.extensions["auth_throttle"].failed(kind, request.remote_addr or "-")
    if retry_after is None:
        return error
    logger.debug("authentication failed audience=%s path=%s remote=%s throttled=%ds",
                 kind, request.path, request.remote_addr, retry_after)
    return ApiError(429, f"too many failed {kind} authentications from this address;"
                         f" retry in {retry_after}s",
                    {"audience": kind, "retry_after": retry_after},
                    headers={"Retry-After": str(retry_after)})


def _unauthorized(kind: str, reason: str | None = None):
    security_event("auth_failed", kind, f"path={request.path} remote={request.remote_addr}"
                   + (f" reason={reason}" if reason else ""))
    detail = {"audience": kind, **({"reason": reason} if reason else {})}
    message = f"authentication failed: {kind} token {reason}" if reason else "authentication failed"
    error = auth_failure(kind, ApiError(401, message, detail,
                                        headers={"WWW-Authenticate": 'Bearer realm="exploop"'}))
    if error.status == 401:
        logger.warning("authentication failed audience=%s path=%s remote=%s%s", kind, request.path,
                       request.remote_addr, f" reason={reason}" if reason else "")
    return error


def find_admin_token(raw: str | None) -> AdminToken | None:
    """The admin token record matching ``raw`` (revoked ones included), or None."""
    return _lookup(AdminToken, raw, "radmin_")


def refuse_credential(kind: str, reason: str | None = None) -> ApiError:
    """A failed authentication of ``kind``, logged and counted toward the ban: 401, or 429 past it."""
    return _unauthorized(kind, reason)


def documented_auth(kind: str):
    """Document a view that checks a ``kind`` credential itself (the lease hot path)."""
    codes = (401, 403, 429) if kind == "agent" else (401, 429)  # 403: a disabled agent

    def decorator(view):
        view.exploop_auth = functools.partial(authenticate, kind)
        return document(view, *codes, security=SCHEMES[kind])
    return decorator


def authenticate(kind: str, role: str = "viewer") -> None:
    """Check the request's ``kind`` credential (``agent``, ``tenant``, ``admin``); set ``g.<kind>``.

    Raises 401 (429 past the failure limit), and 403 when an admin token lacks ``role`` or
    the agent is disabled.
    A revoked admin token is told so (its holder can do nothing with that knowledge), and
    a change refused for lack of role is written to the audit log.
    """
    if kind == "agent":
        agent = _lookup(Agent, bearer_token(), "ragent_")
        if agent is None:
            raise _unauthorized("agent")
        if agent.disabled:  # a valid key, switched off by an admin: say so, not "authentication failed"
            raise ApiError(403, f"agent {agent.name!r} is disabled by an admin: no lease, no jobs until"
                                f" `exploop-admin enable agent {agent.name}`", {"reason": "disabled"})
        g.agent = agent
    elif kind == "tenant":
        tenant = _lookup(Tenant, bearer_token(), "rtenant_")
        if tenant is None:
            raise _unauthorized("tenant")
        g.tenant = tenant
    else:
        token = _lookup(AdminToken, bearer_token(), "radmin_")
        if token is None:
            raise _unauthorized("admin")
        if token.revoked_at is not None:
            raise _unauthorized("admin", "revoked")
        if role == "admin" and token.role != "admin":
            security_event("access_denied", "admin", f"token={token.name} role={token.role}"
                           f" path={request.path}")
            audit(token.name, "permission denied", f"{request.method} {request.path}",
                  f"role={token.role}")
            db.session.commit()
            raise ApiError(403, f"admin token {token.name!r} has role {token.role!r};"
                                " this action needs 'admin'")
        g.admin = token


def _requires(view, kind: str, role: str = "viewer"):
    """Wrap ``view`` with the check of a ``kind`` credential, also kept as ``exploop_auth``
    for the argument parser (401 before 400, exploop.api)."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        authenticate(kind, role)
        return view(*args, **kwargs)
    # functools.wraps copies this onto every decorator above, up to the registered view.
    wrapper.exploop_auth = functools.partial(authenticate, kind, role)  # type: ignore[attr-defined]
    return wrapper


def agent_required(view):
    """Require a valid, enabled agent key (``ragent_...``); sets ``g.agent``. A disabled
    agent's key is answered 403 ``{"reason": "disabled"}``."""
    return document(_requires(view, "agent"), 401, 403, 429, security=SCHEMES["agent"])


def tenant_required(view):
    """Require a tenant API key (``rtenant_...``); sets ``g.tenant``."""
    return document(_requires(view, "tenant"), 401, 429, security=SCHEMES["tenant"])


def admin_required(role: str = "viewer"):
    """Require an admin token (``radmin_...``); ``role="admin"`` for changes."""
    def decorator(view):
        codes = (401, 403, 429) if role == "admin" else (401, 429)
        return document(_requires(view, "admin", role), *codes, security=SCHEMES["admin"], role=role)
    return decorator
