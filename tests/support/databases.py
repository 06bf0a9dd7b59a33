"""Test databases: a fresh SQLite file or the emptied PostgreSQL test database, and rows
that tests need before the API can be called (an admin token, a tenant)."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, text

from exploop.core.extensions import db
from exploop.core.models import AdminToken, Tenant
from exploop.core.security import ADMIN_PREFIX, TENANT_PREFIX, hash_token, new_token

__all__ = ["PG_URL", "fresh_database_url", "add_admin_token", "add_tenant"]

#: Set EXPLOOP_TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1/test) to run the
#: database tests against PostgreSQL instead of a per-test SQLite file.
PG_URL = os.environ.get("EXPLOOP_TEST_DATABASE_URL")


def fresh_database_url(tmp: Path) -> str:
    """A fresh database: a SQLite file under ``tmp``, or the PostgreSQL test database emptied."""
    if PG_URL:
        engine = create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()
        return PG_URL
    return f"sqlite:///{tmp / 'exploop.db'}"


def add_admin_token(app, role="admin", name="ops") -> str:
    token = new_token(ADMIN_PREFIX)
    with app.app_context():
        db.session.add(AdminToken(name=name, role=role, token_hash=hash_token(token)))
        db.session.commit()
    return token


def add_tenant(app, name="acme") -> str:
    key = new_token(TENANT_PREFIX)
    with app.app_context():
        db.session.add(Tenant(name=name, key_hash=hash_token(key)))
        db.session.commit()
    return key
