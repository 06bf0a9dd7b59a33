"""Tenant secrets at rest: repository credentials and secret fingerprints, sealed with the server key.

- A repository URL's credentials (``https://user:token@host/...``) are split off at submit:
  the job row keeps ``https://***@host/...`` and the credentials sealed with the keyring;
  they are opened only for the claim of the job's current attempt, and dropped when the job
  reaches a final state (``models._forget_credentials_at_the_end``).
- A secret found by a scan is stored as HMAC-SHA256 under its tenant's fingerprint key: a
  random key per tenant, sealed with the keyring in the tenant's row. The same secret in two
  tenants gives two hashes; without the server key nobody can test a guess.
"""
from __future__ import annotations

import hashlib
import logging
import re
from typing import cast

from flask import Flask, current_app
from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult

from ..config import ConfigError
from .exceptions import ApiError
from .extensions import db
from .keyring import InvalidToken, Keyring, keyed_hash
from .models import Job, Tenant

__all__ = ["split_credentials", "join_credentials", "seal_repo_url", "agent_repo_url",
           "tenant_fingerprint_key", "keyed_finding", "rotate_all", "check_keyring", "keyring"]

logger = logging.getLogger(__name__)

_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.DOTALL)
HIDDEN = "***"


def split_credentials(url: str) -> tuple[str, str | None]:
    """``(url with its credentials shown as ***, the credentials)``; None when it has none.

    The credentials end at the last ``@`` of the authority, as git and curl read it.
    """
    match = _AUTHORITY.match(url)
    if not match:
        return url, None  # scp-like git@host:path: a user name, no secret
    scheme, authority, rest = match.groups()
    userinfo, at, hostport = authority.rpartition("@")
    if not at:
        return url, None
    if not userinfo:
        return f"{scheme}{hostport}{rest}", None
    return f"{scheme}{HIDDEN}@{hostport}{rest}", userinfo


def join_credentials(shown: str, userinfo: str) -> str:
    """The URL the agent clones: ``***`` replaced by the credentials."""
    return shown.replace(f"://{HIDDEN}@", f"://{userinfo}@", 1)


def keyring() -> Keyring | None:
    return current_app.extensions.get("keyring")


def seal_repo_url(url: str) -> tuple[str, str | None]:
    """What a job row stores for ``url``: the shown URL and the sealed credentials (or None)."""
    shown, userinfo = split_credentials(url)
    if userinfo is None:
        return shown, None
    ring = keyring()
    if ring is None:
        raise ApiError(400, "this server does not accept credentials in repository URLs: its operator"
                            " has not set EXPLOOP_SECRET_KEY",
                       {"repo_url": ["credentials in the URL need a server key (EXPLOOP_SECRET_KEY)"]})
    return shown, ring.encrypt(userinfo)


def agent_repo_url(job: Job) -> str:
    """The URL with its credentials, for the agent that holds the job's current attempt.

    Raises InvalidToken when no configured key opens them (a key removed too early).
    """
    if job.repo_credentials is None:
        return job.repo_url
    ring = keyring()
    if ring is None:
        raise InvalidToken()
    return join_credentials(job.repo_url, ring.decrypt(job.repo_credentials))


def tenant_fingerprint_key(tenant_id: int) -> str | None:
    """The tenant's fingerprint key (made on first use), or None when the server has no key."""
    ring = keyring()
    if ring is None:
        return None
    sealed = db.session.scalar(select(Tenant.fingerprint_key).where(Tenant.id == tenant_id))
    if sealed is None:
        # Two completions at once: the first write wins, both read it back.
        db.session.execute(update(Tenant).where(Tenant.id == tenant_id, Tenant.fingerprint_key.is_(None))
                           .values(fingerprint_key=ring.new_tenant_key()))
        db.session.commit()
        sealed = db.session.scalar(select(Tenant.fingerprint_key).where(Tenant.id == tenant_id))
    if sealed is None:
        raise ApiError(404, f"tenant {tenant_id} not found")
    return ring.decrypt(sealed)


def keyed_finding(item: dict, fingerprint: str, key: str | None) -> tuple[str, str | None]:
    """``(fingerprint, secret_hash)`` to store for a finding the agent reported.

    The agent sends a plain SHA-256 of a secret (and a fingerprint made from it): both are
    keyed with the tenant's key before they are stored. Keying the plain values is what the
    0006 migration does to older rows, so fingerprints stay the same across the migration.
    Without a server key, a secret finding keeps no hash and a fingerprint of where it is.
    """
    plain_hash = item.get("secret_hash")
    if not plain_hash:
        return fingerprint, None
    if key is None:
        basis = "|".join([item["engine"], item["rule_id"], item["path"], str(item.get("start_line"))])
        return hashlib.sha256(basis.encode()).hexdigest()[:32], None
    return keyed_hash(key, fingerprint)[:32], keyed_hash(key, plain_hash)


_SEALED_COLUMNS = ((Job, Job.repo_credentials), (Tenant, Tenant.fingerprint_key))


def rotate_all(batch: int = 200) -> dict[str, int]:
    """Re-seal every stored value under the newest key.

    Idempotent and resumable: values already sealed with the newest key are left alone, and
    each batch is committed. Safe while the API runs: a value is replaced only if it is still
    the one that was read (a job that ended meanwhile keeps its NULL).
    """
    ring = keyring()
    if ring is None:
        raise ConfigError("EXPLOOP_SECRET_KEY is not set: nothing can be re-encrypted")
    counts = {"rotated": 0, "current": 0, "changed_meanwhile": 0}
    for model, column in _SEALED_COLUMNS:
        last = None
        while True:
            query = select(model.id, column).where(column.is_not(None)).order_by(model.id).limit(batch)
            if last is not None:
                query = query.where(model.id > last)
            rows = db.session.execute(query).all()
            if not rows:
                break
            for row_id, sealed in rows:
                if sealed is None or ring.is_current(sealed):
                    counts["current"] += 1
                    continue
                result = cast(CursorResult, db.session.execute(update(model).where(model.id == row_id, column == sealed)
                                            .values({column.key: ring.rotate(sealed)})))
                counts["rotated" if result.rowcount == 1 else "changed_meanwhile"] += 1
            db.session.commit()
            last = rows[-1][0]
    return counts


def check_keyring(app: Flask) -> None:
    """Refuse to start when sealed values exist and no configured key opens them."""
    with app.app_context():
        ring = keyring()
        sealed = None
        for _model, column in _SEALED_COLUMNS:
            sealed = sealed or db.session.scalar(select(column).where(column.is_not(None)).limit(1))
        db.session.remove()
    if sealed is None:
        return
    if ring is None:
        raise ConfigError("EXPLOOP_SECRET_KEY is not set, but the database holds repository credentials"
                          " or fingerprint keys sealed with a server key: set the key they were written with")
    try:
        ring.decrypt(sealed)
    except InvalidToken:
        raise ConfigError("EXPLOOP_SECRET_KEY cannot open the credentials stored in the database: keep the"
                          " key they were written with in the list until `exploop rotate-secrets` has run"
                          ) from None
