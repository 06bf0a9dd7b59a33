"""The Flask application factory."""
from __future__ import annotations

from pathlib import Path

import redis
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from .celery_app import make_celery
from .config import CAPABILITIES, ConfigError, parse_duration, server_defaults
from .extensions import db, migrate
from .leases import LeaseStore
from .routing import queue_for
from .throttle import AuthThrottle

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
    app.extensions["auth_throttle"] = _auth_throttle(app, client)
    parse_duration(app.config["MAX_POLL_TIMEOUT"], "EXPLOOP_MAX_POLL_TIMEOUT")
    time_limit = parse_duration(app.config["JOB_TIME_LIMIT"], "EXPLOOP_JOB_TIME_LIMIT")
    celery_conf = {k.lower(): v for k, v in app.config["CELERY"].items()}
    regions = [r.strip() for r in app.config["REGIONS"].split(",") if r.strip()]
    app.extensions["celery"] = make_celery(
        celery_conf.pop("broker_url", app.config["REDIS_URL"]),
        queues=[queue_for(c, r) for r in regions for c in CAPABILITIES],
        # Longer than any job may run, so Redis never redelivers a running scan.
        visibility_timeout=2 * time_limit + 600,
        overrides=celery_conf)

    from .api import Api, admin, health, platform, tenants
    from .api.errors import register_error_handlers
    api = Api(app, spec_kwargs={"components": {"securitySchemes": _SECURITY_SCHEMES}})
    app.extensions["smorest"] = api
    for blueprint in (platform.bp, tenants.bp, admin.bp, health.bp):
        api.register_blueprint(blueprint)
    _serve_docs_assets(app)
    from .api.console import init_console
    init_console(app)
    register_error_handlers(app)
    _guard_requests(app)
    _observe_requests(app)
    proxies = _non_negative_int(app, "PROXY_COUNT")
    if proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # proto: the console's Secure cookie
    return app


def _non_negative_int(app: Flask, name: str, minimum: int = 0) -> int:
    try:
        value = int(app.config[name])
    except (TypeError, ValueError):
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"EXPLOOP_{name}: expected an integer >= {minimum}, got {app.config[name]!r}")
    return value


_SECURITY_SCHEMES = {
    "agentKey": {"type": "http", "scheme": "bearer", "description": "Agent key (ragent_...)"},
    "tenantKey": {"type": "http", "scheme": "bearer", "description": "Tenant API key (rtenant_...)"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "Admin token (radmin_...); x-required-role says which role"},
}


def _auth_throttle(app: Flask, client: redis.Redis) -> AuthThrottle:
    """The brute-force limits, validated at start (a bad value names its variable)."""
    limit = _non_negative_int(app, "AUTH_FAILURE_LIMIT", minimum=1)
    window = parse_duration(app.config["AUTH_FAILURE_WINDOW"], "EXPLOOP_AUTH_FAILURE_WINDOW")
    block = parse_duration(app.config["AUTH_BLOCK_TIME"], "EXPLOOP_AUTH_BLOCK_TIME")
    return AuthThrottle(client, limit, max(1, int(window)), max(1, int(block)))


def _serve_docs_assets(app: Flask) -> None:
    """Swagger UI's files for /docs, from the swagger-ui-bundle package: no CDN needed."""
    from flask import send_from_directory
    from swagger_ui_bundle import swagger_ui_path

    app.add_url_rule("/docs/static/<path:filename>", endpoint="docs_static",
                     view_func=lambda filename: send_from_directory(swagger_ui_path, filename))


def _guard_requests(app: Flask) -> None:
    """413 for a declared body over MAX_CONTENT_LENGTH before auth or parsing, on every route;
    400 for a NUL character in the path or query.

    Werkzeug enforces the same size limit while reading (also for chunked bodies);
    this refuses early, including on routes that never read their body.
    """
    from flask import request
    from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

    @app.before_request
    def _check_length():
        limit = app.config.get("MAX_CONTENT_LENGTH")
        if limit and request.content_length is not None and request.content_length > limit:
            raise RequestEntityTooLarge(f"request body over {limit} bytes")
        # PostgreSQL cannot store or compare text with NUL: refuse it at the edge, the same
        # on every database (JSON bodies are checked by the parser).
        if "\x00" in request.path or any("\x00" in k or "\x00" in v
                                         for k, v in request.args.items(multi=True)):
            raise BadRequest("NUL characters are not allowed in the path or query")


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
