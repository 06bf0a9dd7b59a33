"""The Flask application factory."""
from __future__ import annotations

import time
from pathlib import Path

import redis
from flask import Flask, g, request, send_from_directory
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy import event
from sqlalchemy.engine import Engine
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from ..broker import Broker, Brokers, KeyLayout, is_sentinel, parse_region_brokers, redact, redis_client
from ..celery_app import make_celery
from ..config import CAPABILITIES, ConfigError, parse_duration, server_defaults
from ..core.extensions import db, migrate
from ..core.keyring import load_keyring
from ..core.leases import LeaseStore
from ..core.migrate import upgrade
from ..core.throttle import AuthThrottle
from ..core.vault import check_keyring
from ..destinations import DestinationPolicy
from ..metrics import REQUEST_LATENCY
from ..routing import queue_for
from . import Api, admin, health, platform, tenants
from .console import init_console
from .errors import register_error_handlers

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
    master_name = app.config["SENTINEL_MASTER_NAME"]
    try:
        client = redis_client(app.config["REDIS_URL"], master_name, socket_timeout=5,
                              socket_connect_timeout=3, health_check_interval=30)
    except ValueError as exc:
        raise ConfigError(f"EXPLOOP_REDIS_URL: {exc}") from None
    app.extensions["redis"] = client
    app.extensions["leases"] = LeaseStore(client)
    reads = _fleet_read_client(app)
    app.extensions["redis_reads"] = reads
    app.extensions["lease_reads"] = LeaseStore(reads)
    app.extensions["auth_throttle"] = _auth_throttle(app, client)
    app.extensions["keyring"] = load_keyring(app.config)
    app.extensions["destinations"] = DestinationPolicy.from_config(app.config)
    parse_duration(app.config["MAX_POLL_TIMEOUT"], "EXPLOOP_MAX_POLL_TIMEOUT")
    time_limit = parse_duration(app.config["JOB_TIME_LIMIT"], "EXPLOOP_JOB_TIME_LIMIT")
    celery_conf = {k.lower(): v for k, v in app.config["CELERY"].items()}
    regions = [r.strip() for r in app.config["REGIONS"].split(",") if r.strip()]
    try:
        region_urls = parse_region_brokers(app.config["REGION_BROKERS"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    default_url = celery_conf.pop("broker_url", app.config["REDIS_URL"])
    brokers: dict[str, Broker] = {}

    def broker_for(url: str) -> Broker:
        if url not in brokers:
            # Each publisher declares only the queues of the regions it carries.
            own = [r for r in regions if region_urls.get(r, default_url) == url]
            own += [r for r, u in region_urls.items() if u == url and r not in own]
            brokers[url] = _broker(app, url, client, own, time_limit, celery_conf)
        return brokers[url]

    default = broker_for(default_url)
    app.extensions["brokers"] = Brokers(default, {r: broker_for(u) for r, u in region_urls.items()})
    # The default broker (regions not in REGION_BROKERS) under its historical names.
    app.extensions["celery"] = default.celery
    app.extensions["broker"] = default

    api = Api(app, spec_kwargs={"components": {"securitySchemes": _SECURITY_SCHEMES}})
    app.extensions["smorest"] = api
    for blueprint in (platform.bp, tenants.bp, admin.bp, health.bp):
        api.register_blueprint(blueprint)
    _serve_docs_assets(app)
    init_console(app)
    register_error_handlers(app)
    _guard_requests(app)
    _observe_requests(app)
    proxies = _non_negative_int(app, "PROXY_COUNT")
    if proxies:
        # x_proto too: the console's Secure cookie behind a TLS proxy. Assigning wsgi_app is Flask's documented way.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]
    return app


def _fleet_read_client(app: Flask) -> redis.Redis:
    """Redis for what operators read in an incident: short timeouts, one reconnect, no retry
    on a timeout, so a hung Redis costs one FLEET_READ_TIMEOUT, not the default retries."""
    timeout = parse_duration(app.config["FLEET_READ_TIMEOUT"], "EXPLOOP_FLEET_READ_TIMEOUT")
    return redis_client(app.config["REDIS_URL"], app.config["SENTINEL_MASTER_NAME"],
                        socket_timeout=timeout, socket_connect_timeout=timeout,
                        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                        health_check_interval=30)


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
    app.add_url_rule("/docs/static/<path:filename>", endpoint="docs_static",
                     view_func=lambda filename: send_from_directory(swagger_ui_path, filename))


def _guard_requests(app: Flask) -> None:
    """413 for a declared body over MAX_CONTENT_LENGTH before auth or parsing, on every route;
    400 for a NUL character in the path or query.

    Werkzeug enforces the same size limit while reading (also for chunked bodies);
    this refuses early, including on routes that never read their body.
    """
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
    """Request latency per endpoint (route template, never a raw path: bounded labels), and a
    ``Server-Timing: app;dur=<ms>`` header on every answer."""
    @app.before_request
    def _start_timer():
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response):
        started = g.pop("request_started", None)
        if started is not None:
            elapsed = time.perf_counter() - started
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            REQUEST_LATENCY.labels(endpoint, request.method, f"{response.status_code // 100}xx").observe(elapsed)
            # Time spent in the API, for operators and the benchmarks (bench/get_agents.py).
            response.headers["Server-Timing"] = f"app;dur={elapsed * 1000:.1f}"
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


def init_db(app: Flask, check_keys: bool = True) -> None:
    """Migrate the database to the latest revision (run once before the server forks its workers).

    Concurrent starts are safe: ``exploop.core.migrate.upgrade`` holds a migration lock.
    ``check_keys=False`` for commands that never open sealed values (``create-admin-token``).
    """
    uri = app.config["SQLALCHEMY_DATABASE_URI"]
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    upgrade(app)
    if check_keys:
        check_keyring(app)  # stored credentials no configured key opens: refuse to start


def _broker(app: Flask, url: str, client: redis.Redis, regions: list[str], time_limit: float,
            celery_conf: dict) -> Broker:
    """One broker: its Celery publisher, its Redis (the same client when it is REDIS_URL), kombu's layout."""
    master_name = app.config["SENTINEL_MASTER_NAME"]
    overrides = dict(celery_conf)
    if is_sentinel(url):
        # kombu's sentinel:// transport finds the master by this name.
        overrides["broker_transport_options"] = {"master_name": master_name,
                                                 **overrides.get("broker_transport_options", {})}
    celery = make_celery(
        url, queues=[queue_for(c, r) for r in regions for c in CAPABILITIES],
        # Longer than any job may run, so Redis never redelivers a running scan.
        visibility_timeout=2 * time_limit + 600, overrides=overrides)
    options = celery.conf.broker_transport_options
    if url != app.config["REDIS_URL"]:
        try:
            client = redis_client(url, options.get("master_name"), socket_timeout=5, socket_connect_timeout=3,
                                  health_check_interval=30)
        except ValueError as exc:
            raise ConfigError(f"broker {redact(url)!r}: {exc}") from None
    return Broker(client, KeyLayout.from_transport_options(options), url=url, celery=celery,
                  master_name=options.get("master_name"))
