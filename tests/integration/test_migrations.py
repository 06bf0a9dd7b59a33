"""Schema migrations: ``upgrade`` builds exactly the models' schema, on SQLite and PostgreSQL.

Every test runs on a fresh SQLite file, and again on PostgreSQL when
EXPLOOP_TEST_DATABASE_URL is set (``-k migration`` selects this file).
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import time
from configparser import ConfigParser
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from exploop.api.app import create_app, init_db
from exploop.core.extensions import MIGRATIONS_DIR, db
from exploop.core.migrate import BASELINE_REVISION, current_revision, head_revision, migration_lock
from exploop.core.models import Tenant
from exploop.run.children import script

PG_URL = os.environ.get("EXPLOOP_TEST_DATABASE_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=BACKENDS)
def migration_db_url(request, tmp_path):
    """An empty database: a SQLite file, or the PostgreSQL test database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'exploop.db'}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


@pytest.fixture
def migration_app(migration_db_url):
    # Redis is never contacted: the client connects lazily.
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": migration_db_url,
                      "REDIS_URL": "redis://127.0.0.1:1/0"})
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def schema_diff(app) -> list:
    """Alembic autogenerate's comparison of the live database with the models (empty: same)."""
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={
            "compare_type": True, "compare_server_default": True})
        return compare_metadata(context, db.metadata)


def tables(app) -> set[str]:
    with app.app_context(), db.engine.connect() as connection:
        return set(inspect(connection).get_table_names())


def test_migration_upgrade_creates_exactly_the_models_schema(migration_app):
    init_db(migration_app)
    assert schema_diff(migration_app) == [], (
        "the models and the migrations differ: add a revision with "
        "`flask --app exploop.api.app db migrate -m '...' --rev-id NNNN`")
    with migration_app.app_context():
        assert current_revision(db.engine) == head_revision()
    assert tables(migration_app) == set(db.metadata.tables) | {"alembic_version"}


def test_migration_upgrade_is_idempotent(migration_app):
    init_db(migration_app)
    with migration_app.app_context():
        db.session.add(Tenant(name="acme", key_hash="h" * 64))
        db.session.commit()
    init_db(migration_app)
    with migration_app.app_context():
        assert db.session.scalar(select(Tenant.name)) == "acme"
        assert db.session.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_migration_downgrade_to_base_and_upgrade_again(migration_app):
    init_db(migration_app)
    with migration_app.app_context():
        command.downgrade(migration_app.extensions["migrate"].migrate.get_config(), "base")
        assert current_revision(db.engine) is None
    assert tables(migration_app) == {"alembic_version"}
    init_db(migration_app)
    assert schema_diff(migration_app) == []


def test_migration_adopts_a_database_made_by_create_all(migration_app):
    """A database from before migrations (create_all) is stamped, its rows kept."""
    with migration_app.app_context():
        db.create_all()
        db.session.add(Tenant(name="old", key_hash="k" * 64))
        db.session.commit()
    init_db(migration_app)
    with migration_app.app_context():
        assert current_revision(db.engine) == head_revision()
        assert db.session.scalar(select(Tenant.name)) == "old"
    assert schema_diff(migration_app) == []


def test_migration_adopts_a_create_all_database_without_named_constraints(migration_app):
    """Databases from before the naming convention: unnamed constraints, same columns."""
    from sqlalchemy import MetaData
    plain = MetaData()
    for table in db.metadata.sorted_tables:
        copy = table.to_metadata(plain)
        for constraint in copy.constraints:
            if not isinstance(constraint, type(copy.primary_key)):
                constraint.name = None
    with migration_app.app_context():
        plain.create_all(db.engine)
    init_db(migration_app)
    with migration_app.app_context():
        assert current_revision(db.engine) == head_revision()


def test_migration_refuses_an_unversioned_database_that_differs(migration_app):
    with migration_app.app_context():
        db.metadata.tables["tenants"].create(db.engine)
        db.session.execute(text("ALTER TABLE tenants ADD COLUMN legacy_flag VARCHAR(32)"))
        db.session.commit()
    with pytest.raises(RuntimeError) as refused:
        init_db(migration_app)
    message = str(refused.value)
    assert "has Exploop tables but no alembic_version, and they differ from this version's models" in message
    assert "table admin_tokens missing" in message and "; ...)" in message
    with migration_app.app_context():
        assert current_revision(db.engine) is None


def test_migration_waits_for_the_lock_then_finds_nothing_to_do(migration_app, migration_db_url, tmp_path):
    """A second start blocks while another process migrates, then sees the database at head."""
    env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=migration_db_url,
               EXPLOOP_REDIS_URL="redis://127.0.0.1:1/0")
    with migration_app.app_context(), migration_lock(db.engine):
        waiting = subprocess.Popen([script("exploop"), "init-db"], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(3)
        assert waiting.poll() is None, waiting.communicate()
        # Still holding the lock: migrate here, as the first process would.
        command.upgrade(migration_app.extensions["migrate"].migrate.get_config(), "head")
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    with migration_app.app_context():
        assert out.strip() == f"database ready at revision {head_revision()}"
    assert schema_diff(migration_app) == []


def test_migration_lock_timeout_names_the_lock(migration_app):
    with migration_app.app_context(), migration_lock(db.engine):
        url = db.engine.url.render_as_string(hide_password=False)
        child = subprocess.run(
            [sys.executable, "-c", "from exploop.api.app import create_app; from exploop.core.migrate import upgrade;"
             f" upgrade(create_app({{'SQLALCHEMY_DATABASE_URI': {url!r}}}), timeout=1)"],
            capture_output=True, text=True, timeout=60)
    assert child.returncode != 0
    assert "MigrationLockTimeout: database migrations:" in child.stderr
    assert "still held after 1s by another process" in child.stderr


def test_migration_concurrent_starts_all_succeed(migration_app, migration_db_url):
    """api, controller and init-db starting together: one migrates, none fails."""
    env = dict(os.environ, EXPLOOP_SQLALCHEMY_DATABASE_URI=migration_db_url,
               EXPLOOP_REDIS_URL="redis://127.0.0.1:1/0")
    procs = [subprocess.Popen([script("exploop"), "init-db"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = [(p.wait(timeout=120), p.communicate()) for p in procs]
    assert [code for code, _ in results] == [0, 0, 0, 0], [err for _, (_, err) in results]
    assert schema_diff(migration_app) == []
    with migration_app.app_context():
        assert db.session.execute(text("SELECT version_num FROM alembic_version")).scalars().all() \
            == [head_revision()]


def test_migration_revisions_form_one_line_from_the_baseline(migration_app):
    from alembic.script import ScriptDirectory
    with migration_app.app_context():
        scripts = ScriptDirectory.from_config(migration_app.extensions["migrate"].migrate.get_config())
    assert len(scripts.get_heads()) == 1, "migration branches: merge them (flask db merge)"
    assert scripts.get_base() == BASELINE_REVISION


def test_migration_files_are_package_data():
    """A non-editable install (the Docker images) ships every migration file."""
    parser = ConfigParser()
    parser.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in parser["options.package_data"]["exploop"].split(",")]
    package = MIGRATIONS_DIR.parent.parent  # the exploop package: setup.cfg patterns start there
    shipped = [f for f in MIGRATIONS_DIR.rglob("*")
               if f.is_file() and "__pycache__" not in f.parts]
    missing = [str(f.relative_to(package)) for f in shipped
               if not any(fnmatch.fnmatch(str(f.relative_to(package)), p) for p in patterns)]
    assert shipped and missing == []



def test_0002_keeps_existing_rows_with_the_defaults(migration_app):
    """Tenants and jobs from before plans and priorities get plan starter, priority normal,
    and an admission key equal to their creation time."""
    from exploop.core.migrate import upgrade
    upgrade(migration_app, "0001")
    with migration_app.app_context():
        db.session.execute(text("INSERT INTO tenants (id, name, key_hash, created_at) "
                                "VALUES (1, 'old', 'h', '2026-01-01 00:00:00')"))
        db.session.execute(text(
            "INSERT INTO jobs (id, tenant_id, capability, region, repo_url, ref, status, attempt, max_attempts,"
            " time_limit, progress, created_at) VALUES ('j1', 1, 'sast', 'r', 'https://x/y', 'HEAD', 'pending',"
            " 1, 3, 60, 0, '2026-01-02 03:04:05')"))
        db.session.commit()
    upgrade(migration_app, "head")
    with migration_app.app_context():
        row = db.session.execute(text("SELECT t.plan, j.priority, j.admission_key, j.created_at FROM jobs j"
                                      " JOIN tenants t ON t.id = j.tenant_id")).one()
        assert row[0] == "starter" and row[1] == "normal" and str(row[2]) == str(row[3])
    assert schema_diff(migration_app) == []
