"""Hermetic fixtures: a private redis-server, a fresh database, the app, real API and agent
processes, and factories for the rows a test needs (flaskr's ``auth`` fixture pattern).

Set EXPLOOP_TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1/test) to run the
database tests against PostgreSQL instead of a per-test SQLite file. The machinery lives
in ``tests/support/``; test modules import from there, never from this file.
"""
from __future__ import annotations

import pytest
import redis as redis_lib

from exploop.api.app import create_app, init_db
from exploop.core.extensions import db
from exploop.run.children import free_port, start_redis
from tests.support.databases import add_admin_token, add_tenant, fresh_database_url
from tests.support.stack import TEST_SECRET_KEY, RestartableRedis, Stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server on a free loopback port for the whole session."""
    port = free_port()
    child = start_redis(port, tmp_path_factory.mktemp("redis") / "redis.log")
    yield f"redis://127.0.0.1:{port}/0"
    child.stop()


@pytest.fixture
def redis_url(redis_server):
    """A clean Redis for each test."""
    redis_lib.Redis.from_url(redis_server).flushall()
    return redis_server


@pytest.fixture
def redis_client(redis_url):
    client = redis_lib.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def database_url(tmp_path):
    return fresh_database_url(tmp_path)


@pytest.fixture
def app_config(database_url, redis_url):
    return {"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url, "REDIS_URL": redis_url,
            "ALLOW_LOCAL_REPOS": True, "REGIONS": "us-east-1", "SECRET_KEY": TEST_SECRET_KEY}


@pytest.fixture
def app(app_config):
    app = create_app(app_config)
    init_db(app)
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
    app.extensions["redis"].close()
    app.extensions["redis_reads"].close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_admin_token(app):
    """Factory: ``make_admin_token(role="viewer", name="watcher")`` adds an admin token to the
    test's app (or to ``app=other``) and returns its value."""
    test_app = app

    def make(role: str = "admin", name: str = "ops", *, app=None) -> str:
        return add_admin_token(app or test_app, role=role, name=name)
    return make


@pytest.fixture
def make_tenant(app):
    """Factory: ``make_tenant("globex")`` adds a tenant and returns its API key."""
    test_app = app

    def make(name: str = "acme", *, app=None) -> str:
        return add_tenant(app or test_app, name=name)
    return make


@pytest.fixture
def admin_token(make_admin_token):
    return make_admin_token()


@pytest.fixture
def tenant_key(make_tenant):
    return make_tenant()


@pytest.fixture
def stack(tmp_path, database_url, redis_url):
    """A real API (started by the test with ``stack.start_api()``), controller and agents."""
    s = Stack(tmp_path, database_url, redis_url)
    yield s
    s.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A private Redis the test may stop and restart (empty, like a Redis without persistence)."""
    server = RestartableRedis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def own_redis_stack(tmp_path, database_url, own_redis):
    """A stack on its own Redis (``own_redis``), for tests that stop or restart Redis."""
    s = Stack(tmp_path, database_url, own_redis.url)
    yield s
    s.stop()
