"""Schema migrations: every start brings the database to the latest revision.

``exploop api``, ``exploop controller`` and ``exploop init-db`` call
:func:`upgrade` (through ``exploop.api.app.init_db``) before they serve. Several of
them may start at once (compose starts api and controller together, Kubernetes
rolls pods), so the upgrade runs under a lock every process agrees on: a
PostgreSQL session advisory lock, or an exclusive ``flock`` on a file beside the
SQLite database. The first process migrates; the others wait, then find the
database at head and do nothing.

A database created by ``db.create_all()`` before migrations existed (an older
``exploop up`` under ``.exploop/``) has no ``alembic_version``: when its tables and
columns are exactly the models', it is stamped at head; otherwise the start is
refused with the differences.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask, current_app
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from .extensions import db

__all__ = ["upgrade", "current_revision", "head_revision", "migration_lock",
           "MigrationLockTimeout", "BASELINE_REVISION", "LOCK_ID"]

logger = logging.getLogger(__name__)

#: The first revision: the schema as ``create_all`` made it before migrations.
BASELINE_REVISION = "0001"
#: pg_advisory_lock key shared by every Exploop process ("exploop" in ASCII).
LOCK_ID = int.from_bytes(b"exploop", "big")
#: How long a start waits for another process's migration before giving up.
LOCK_TIMEOUT = 600.0


class MigrationLockTimeout(RuntimeError):
    """Another process held the migration lock for longer than we wait."""


def _alembic_config():
    return current_app.extensions["migrate"].migrate.get_config()


def head_revision() -> str:
    """The newest revision shipped with this code."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:  # a package built without its migrations/ folder
        raise RuntimeError("no database migrations shipped with this installation")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def migration_lock(engine: Engine, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the cluster-wide migration lock for this database."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        with _pg_advisory_lock(engine, timeout):
            yield
    elif dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        with _file_lock(Path(engine.url.database + ".migrate.lock"), timeout):
            yield
    else:
        # An in-memory SQLite database is private to this process; other backends
        # are not supported for concurrent starts: run `exploop init-db` first.
        logger.warning("no migration lock for %s: start one process first (exploop init-db)",
                       dialect)
        yield


@contextlib.contextmanager
def _pg_advisory_lock(engine: Engine, timeout: float) -> Iterator[None]:
    # A session lock on a connection of its own: held across the migration's
    # commits, released by unlock or, if this process dies, by the disconnect.
    with engine.connect() as connection:
        _wait_for(lambda: connection.execute(
            text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID}).scalar(),
            timeout, f"PostgreSQL advisory lock {LOCK_ID}", after_try=connection.rollback)
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
            connection.commit()


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        def try_lock() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        _wait_for(try_lock, timeout, f"lock file {path}")
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(try_lock, timeout: float, what: str, after_try=None) -> None:
    deadline = time.monotonic() + timeout
    waiting = False
    while not try_lock():
        if after_try is not None:
            after_try()
        if not waiting:
            logger.info("waiting for another process to finish database migrations (%s)", what)
            waiting = True
        if time.monotonic() >= deadline:
            raise MigrationLockTimeout(
                f"database migrations: {what} still held after {timeout:.0f}s by another process")
        time.sleep(0.2)


def _adopt_unversioned(engine: Engine) -> None:
    """Stamp a pre-migration database (made by create_all, no version table) at head.

    Such a database was made from the models of the code that made it: when its
    tables and columns are exactly this version's models, it is at this version's
    head. Anything else is refused rather than guessed.
    """
    with engine.connect() as connection:
        inspector = inspect(connection)
        tables = set(inspector.get_table_names())
        if "alembic_version" in tables or not tables & set(db.metadata.tables):
            return
        problems = []
        for name, table in sorted(db.metadata.tables.items()):
            if name not in tables:
                problems.append(f"table {name} missing")
                continue
            have = {column["name"] for column in inspector.get_columns(name)}
            want = {column.name for column in table.columns}
            problems += [f"column {name}.{c} missing" for c in sorted(want - have)]
            problems += [f"column {name}.{c} unknown" for c in sorted(have - want)]
    if problems:
        raise RuntimeError(
            "database migrations: the database has Exploop tables but no alembic_version, and"
            f" they differ from this version's models ({'; '.join(problems[:5])}"
            f"{'; ...' if len(problems) > 5 else ''}); start from an empty database, or stamp"
            " the revision it is at: flask --app exploop.api.app db stamp <revision>")
    logger.warning("database was created before migrations: stamping it at revision %s",
                   head_revision())
    command.stamp(_alembic_config(), "head")


def upgrade(app: Flask, revision: str = "head", timeout: float = LOCK_TIMEOUT) -> None:
    """Migrate the app's database to ``revision`` under the migration lock."""
    with app.app_context():
        engine = db.engine
        with migration_lock(engine, timeout):
            _adopt_unversioned(engine)
            before = current_revision(engine)
            command.upgrade(_alembic_config(), revision)
            after = current_revision(engine)
        if before != after:
            logger.info("database migrated from %s to %s", before or "empty", after)
