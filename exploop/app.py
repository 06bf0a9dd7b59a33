"""The Flask application factory."""
from __future__ import annotations

from pathlib import Path

import redis
from flask import Flask
from flask_smorest import Api
from sqlalchemy import event
from sqlalchemy.engine import Engine

from .celery_app import make_celery
from .config import CAPABILITIES, parse_duration, server_defaults
from .extensions import db, migrate
from .leases import LeaseStore
from .routing import queue_for

__all__ = ["create_app", "init_db"]


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure an instance of the Flask application."""
    app = Flask(__name__)
    app.config.from_mapping(server_defaults())
    app.config.from_prefixed_env("EXPLOOP")
    if test_config:
        app.config.from_mapping(test_config)
    _configure_database(app)

    db.init_app(app)
    migrate.init_app(app, db)
    client = redis.Redis.from_url(app.config["REDIS_URL"], socket_timeout=5,
                                  socket_connect_timeout=3, health_check_interval=30)
    app.extensions["redis"] = client
    app.extensions["leases"] = LeaseStore(client)
    time_limit = parse_duration(app.config["JOB_TIME_LIMIT"], "EXPLOOP_JOB_TIME_LIMIT")
    celery_conf = {k.lower(): v for k, v in app.config["CELERY"].items()}
    regions = [r.strip() for r in app.config["REGIONS"].split(",") if r.strip()]
    app.extensions["celery"] = make_celery(
        celery_conf.pop("broker_url", app.config["REDIS_URL"]),
        queues=[queue_for(c, r) for r in regions for c in CAPABILITIES],
        # Longer than any job may run, so Redis never redelivers a running scan.
        visibility_timeout=2 * time_limit + 600,
        overrides=celery_conf)

    from .api import admin, health, platform, tenants
    from .api.errors import register_error_handlers
    api = Api(app, spec_kwargs={"components": {"securitySchemes": {
        "bearer": {"type": "http", "scheme": "bearer"}}}, "security": [{"bearer": []}]})
    app.extensions["smorest"] = api
    for blueprint in (platform.bp, tenants.bp, admin.bp):
        api.register_blueprint(blueprint)
    app.register_blueprint(health.bp)
    register_error_handlers(app)
    _observe_requests(app)
    return app


def _observe_requests(app: Flask) -> None:
    """Request latency per endpoint (route template, never a raw path: bounded labels)."""
    import time

    from flask import g, request

    from .metrics import REQUEST_LATENCY

    @app.before_request
    def _start_timer():
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response):
        started = g.pop("request_started", None)
        if started is not None:
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            REQUEST_LATENCY.labels(endpoint, request.method, f"{response.status_code // 100}xx").observe(
                time.perf_counter() - started)
        return response


def _configure_database(app: Flask) -> None:
    """Engine options per backend: SQLite waits for locks, PostgreSQL checks pooled connections."""
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    options = dict(app.config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    if uri.startswith("sqlite"):
        # Wait for the write lock instead of failing under concurrent requests.
        options.setdefault("connect_args", {"timeout": 30, "check_same_thread": False})
    else:
        options.setdefault("pool_pre_ping", True)
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record):
    """WAL lets readers work during writes; foreign keys keep rows consistent."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def init_db(app: Flask) -> None:
    """Migrate the database to the latest revision (run once before the server forks its workers).

    Concurrent starts are safe: ``exploop.schema.upgrade`` holds a migration lock.
    """
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    from .schema import upgrade
    upgrade(app)
