"""Secrets at rest: sealed repository credentials, per-tenant keyed secret fingerprints.

Existing rows are converted with the server key (EXPLOOP_SECRET_KEY or _FILE):
- a job URL's credentials move, sealed, to ``jobs.repo_credentials`` and the URL keeps
  ``***`` in their place; jobs already in a final state just lose them (they are never
  cloned again);
- each tenant with secret findings gets a fingerprint key, and its findings' plain SHA-256
  ``secret_hash`` and ``fingerprint`` become HMACs of those values under it: exactly what
  new completions store, so fingerprints stay the same across the upgrade.
With rows to convert and no key set, the upgrade stops with one line saying so. SQLite
and PostgreSQL may keep the old bytes in free pages until VACUUM (docs/security.md).

Downgrade drops the new columns: sealed credentials are lost (jobs keep ``***``) and
keyed hashes stay keyed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 10:05:00

"""
import os

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

FINAL = ("completed", "failed", "cancelled")


def _keyring():
    from exploop.core.keyring import load_keyring
    try:
        from flask import current_app
        if "keyring" in current_app.extensions:
            return current_app.extensions["keyring"]
    except RuntimeError:  # no app context: the environment says
        pass
    return load_keyring({"SECRET_KEY": os.environ.get("EXPLOOP_SECRET_KEY"),
                         "SECRET_KEY_FILE": os.environ.get("EXPLOOP_SECRET_KEY_FILE")})


def _need_key(ring, what: str):
    from exploop.config import ConfigError
    if ring is None:
        raise ConfigError(f"database migration 0003: {what} must be converted with the server key;"
                          " set EXPLOOP_SECRET_KEY (see docs/security.md), then start again")
    return ring


def upgrade():
    from exploop.core.keyring import keyed_hash
    from exploop.core.vault import split_credentials

    bind = op.get_bind()
    jobs = sa.table('jobs', sa.column('id'), sa.column('tenant_id'), sa.column('repo_url'),
                    sa.column('status'), sa.column('repo_credentials'))
    tenants = sa.table('tenants', sa.column('id'), sa.column('fingerprint_key'))
    findings = sa.table('findings', sa.column('id'), sa.column('job_id'), sa.column('secret_hash'),
                        sa.column('fingerprint'))
    # Decide before any DDL (SQLite's is not transactional) whether the key is needed.
    moves = []
    for job_id, url, status in bind.execute(sa.select(jobs.c.id, jobs.c.repo_url, jobs.c.status)).all():
        shown, userinfo = split_credentials(url)
        if userinfo is not None and shown != url:
            moves.append((job_id, shown, userinfo if status not in FINAL else None))
    rows = bind.execute(sa.select(findings.c.id, findings.c.secret_hash, findings.c.fingerprint,
                                  jobs.c.tenant_id)
                        .select_from(findings.join(jobs, jobs.c.id == findings.c.job_id))
                        .where(findings.c.secret_hash.is_not(None))).all()
    ring = None
    if any(userinfo for _, _, userinfo in moves):
        ring = _need_key(_keyring(), "repository credentials of waiting or running jobs")
    if rows:
        ring = _need_key(_keyring(), "fingerprints of secret findings")

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('repo_credentials', sa.Text(), nullable=True))
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fingerprint_key', sa.Text(), nullable=True))

    for job_id, shown, userinfo in moves:
        bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
            repo_url=shown, repo_credentials=ring.encrypt(userinfo) if userinfo else None))
    keys = {}
    for finding_id, plain_hash, fingerprint, tenant_id in rows:
        if tenant_id not in keys:
            sealed = ring.new_tenant_key()
            bind.execute(sa.update(tenants).where(tenants.c.id == tenant_id).values(fingerprint_key=sealed))
            keys[tenant_id] = ring.decrypt(sealed)
        key = keys[tenant_id]
        bind.execute(sa.update(findings).where(findings.c.id == finding_id).values(
            secret_hash=keyed_hash(key, plain_hash), fingerprint=keyed_hash(key, fingerprint)[:32]))


def downgrade():
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('fingerprint_key')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('repo_credentials')
