"""Every setting with its default, and the duration parser both sides use.

Server settings are Flask config keys, layered in ``create_app``: the defaults
below, then ``EXPLOOP_*`` environment variables (``EXPLOOP_REDIS_URL``,
``EXPLOOP_CELERY__broker_url``...), then ``test_config``. Agent settings are the
runbook's environment variables, read by :class:`AgentSettings`.
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ConfigError", "parse_duration", "format_duration", "server_defaults",
    "AgentSettings", "CAPABILITIES", "data_dir", "parse_size", "format_size", "ScannerSettings",
    "agent_key_file", "DEFAULT_KEY_FILE", "local_stack_record", "REGION_PATTERN", "AGENT_NAME_PATTERN",
]

#: Scan capabilities the platform knows; agents advertise a subset.
CAPABILITIES = ("sast", "sca", "secrets")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the setting."""


def parse_duration(value: str | int | float, name: str = "duration") -> float:
    """Parse ``30s``, ``5m``, ``1h``, ``7d``, ``250ms`` or a bare number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(
                f"{name}: invalid duration {value!r} (use e.g. 30s, 5m, 1h, 7d)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{name}: duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way the runbook's tables do: ``12s``, ``4m``, ``2h``, ``3d``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def local_stack_record() -> Path:
    """Where ``exploop up`` notes its data directory, for commands run from elsewhere."""
    return Path.home() / ".exploop" / "local-stack.json"


def data_dir() -> Path:
    """Local state directory for the API (SQLite) and ``exploop up``."""
    return Path(os.environ.get("EXPLOOP_DATA_DIR", Path.cwd() / ".exploop"))


def server_defaults() -> dict:
    """Default Flask config of the API; every key can be set as ``EXPLOOP_<KEY>``."""
    return {
        # Database: SQLite under the data directory; PostgreSQL in production.
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{data_dir() / 'exploop.db'}",
        # Redis holds broker queues and leases; nothing in it is the only copy. Either
        # redis://host:6379/0 or, through Redis Sentinel, sentinel://h1:26379;sentinel://h2:26379
        # (kombu's form) with SENTINEL_MASTER_NAME naming the monitored master.
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        # The master name the sentinels monitor (every sentinel:// URL: REDIS_URL, the broker,
        # REGION_BROKERS).
        "SENTINEL_MASTER_NAME": "exploop",
        # Region-sharded brokers: "region=url,region=url" (or a JSON object). Jobs of a named
        # region are published to, polled from and repaired on that broker; every other region
        # uses the default broker (CELERY__broker_url, else REDIS_URL). Leases stay on REDIS_URL.
        "REGION_BROKERS": "",
        # Broker URL handed to agents (defaults to REDIS_URL as the API sees it).
        "AGENT_BROKER_URL": None,
        # Regions accepted for jobs besides those of registered agents (comma separated).
        "REGIONS": "",
        # Default per-job time limit; the broker visibility timeout is derived from it.
        "JOB_TIME_LIMIT": "30m",
        # Deliveries of one job before it fails permanently.
        "JOB_MAX_ATTEMPTS": 3,
        # Plans: max_concurrent = jobs queued + running (the rest wait as pending);
        # max_queue = jobs waiting (pending + queued): a submit beyond it gets 429.
        "PLANS": {"free": {"max_concurrent": 2, "max_queue": 10},
                  "starter": {"max_concurrent": 5, "max_queue": 50},
                  "pro": {"max_concurrent": 10, "max_queue": 100},
                  "enterprise": {"max_concurrent": 50, "max_queue": 500}},
        # Plan of a tenant created without one.
        "DEFAULT_PLAN": "starter",
        # A waiting job gains one priority level per PRIORITY_AGING: a low job waiting
        # 3 x this long outranks a critical job that just arrived.
        "PRIORITY_AGING": "5m",
        # Scoped job tokens live for the job's time limit plus this.
        "JOB_TOKEN_GRACE": "10m",
        # Accept file:// repository URLs (local stacks and tests only).
        "ALLOW_LOCAL_REPOS": False,
        # The server key (EXPLOOP_SECRET_KEY: Fernet keys, newest first, comma separated) or a file
        # holding them: seals repository credentials and keys secret fingerprints (docs/security.md).
        "SECRET_KEY": None,
        "SECRET_KEY_FILE": None,
        # Repository destination policy: exceptions to "public addresses only" (hosts, *.suffix
        # patterns, CIDRs), and destinations refused whatever they resolve to.
        "REPO_DESTINATIONS_ALLOW": "",
        "REPO_DESTINATIONS_DENY": "",
        # Bounds on the lease TTL an agent may ask for (3 x its heartbeat interval).
        "LEASE_TTL_MIN": "3s",
        "LEASE_TTL_MAX": "10m",
        # Longest a POST /platform/poll is held open; GET /platform/config tells agents, which
        # cap their POLL_TIMEOUT to it. Below gunicorn's graceful_timeout (45s), so a stopping
        # API answers every held poll.
        "MAX_POLL_TIMEOUT": "30s",
        # A job handed out by a poll must be claimed within this, else it goes back to its queue.
        "POLL_CLAIM_WINDOW": "10s",
        # Polls one API process holds at once (one Redis connection each); more get 503.
        "MAX_HELD_POLLS": 5000,
        # Brute-force protection, per client address and credential kind (agent key, tenant
        # key, admin token, bootstrap token): after AUTH_FAILURE_LIMIT failed authentications
        # within AUTH_FAILURE_WINDOW, further failures get 429 + Retry-After until
        # AUTH_BLOCK_TIME has passed. Valid credentials are never refused and never counted.
        # The limit is sized for a whole NAT'd fleet whose keys are revoked at once (each
        # such agent fails about twice, then stops; docs/api.md "Rate limiting").
        "AUTH_FAILURE_LIMIT": 1000,
        "AUTH_FAILURE_WINDOW": "5m",
        "AUTH_BLOCK_TIME": "15m",
        # Reverse proxies in front of the API whose X-Forwarded-For is trusted, so the limit
        # above counts the real client, not the proxy (0: use the peer address).
        "PROXY_COUNT": 0,
        # Socket timeout of the Redis reads behind `get agents`, `describe agent`,
        # `cluster-info` and /health: when Redis hangs they answer degraded, from the
        # database, well within the CLI's 10s timeout instead of waiting on Redis.
        "FLEET_READ_TIMEOUT": "1s",
        # Admin console (/ui/): a session ends after this long without a request; live pages
        # (agents, agent) refresh once per CONSOLE_REFRESH (docs/console.md).
        "CONSOLE_IDLE_TIMEOUT": "30m",
        "CONSOLE_REFRESH": "2s",
        "CELERY": {},
        "API_TITLE": "Exploop API",
        "API_VERSION": "v1",
        "OPENAPI_VERSION": "3.0.3",
        "OPENAPI_URL_PREFIX": "/",
        "OPENAPI_JSON_PATH": "openapi.json",
        # Rendered reference at /docs (Swagger UI served from the swagger-ui-bundle package).
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": "/docs/static/",
        # Largest request body (bytes); larger ones are refused with 413 before any work.
        # Sized for an agent's findings report, the largest body the API takes.
        "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,
    }


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a positive integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {raw!r}")
    return value


_LOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warn": "WARNING",
               "warning": "WARNING", "error": "ERROR"}
#: Regions and agent names, as the API accepts them (an agent name also names its key file).
REGION_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
AGENT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

#: The saved key of an agent started without AGENT_NAME (and, from before keys were
#: saved per name, of any agent: a named agent still finds its own key there).
DEFAULT_KEY_FILE = "agent.json"


def agent_key_file(state_dir: Path, name: str | None) -> Path:
    """Where an agent saves its key: ``agents/<AGENT_NAME>.json`` under its state directory
    (``EXPLOOP_STATE_DIR``, default ``~/.exploop``), or ``agent.json`` without AGENT_NAME.

    One file per name: two agents on one host, as one user, never share an identity.
    """
    return state_dir / "agents" / f"{name}.json" if name else state_dir / DEFAULT_KEY_FILE


def _simulated(env: Mapping[str, str]) -> float | None:
    """EXPLOOP_SIMULATED_SCAN: benchmarks and fleet tests replace scans with a sleep."""
    raw = env.get("EXPLOOP_SIMULATED_SCAN")
    if not raw:
        return None
    return 0.0 if raw in ("0", "0s") else parse_duration(raw, "EXPLOOP_SIMULATED_SCAN")


def _metrics_port(env: Mapping[str, str]) -> int | None:
    raw = (env.get("METRICS_PORT") or "9100").strip().lower()
    if raw in ("off", "none", "disabled"):
        return None
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(f"METRICS_PORT: expected a port number or 'off', got {raw!r}")
    return int(raw)


def _memory_limit(env: Mapping[str, str]) -> int | None:
    raw = env.get("MEMORY_LIMIT")
    if not raw:
        return None
    return parse_size(raw, "MEMORY_LIMIT")


def _ratio(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 < value <= 1:
        raise ConfigError(f"{name}: expected a number in (0, 1], got {raw!r}")
    return value


@dataclass(frozen=True)
class AgentSettings:
    """The agent's configuration: the runbook's environment variables, validated."""

    api_url: str
    api_key: str | None = None
    bootstrap_token: str | None = None
    region: str | None = None
    capabilities: tuple[str, ...] | None = None
    max_concurrent_jobs: int | None = None
    log_level: str = "INFO"
    heartbeat_interval: float = 30.0
    poll_timeout: float = 30.0
    agent_name: str | None = None
    broker_url: str | None = None
    simulated_scan_seconds: float | None = None
    metrics_port: int | None = 9100
    memory_limit: int | None = None
    memory_warn_ratio: float = 0.9
    state_dir: Path = field(default_factory=lambda: Path.home() / ".exploop")
    # "celery": consume the broker queues; "http": long-poll POST /platform/poll (HTTPS only).
    transport: str = "celery"
    host: str = field(default_factory=socket.gethostname)

    # Defaults applied when neither the environment nor the agent record says.
    DEFAULT_CAPABILITIES = ("sast", "sca")
    DEFAULT_MAX_JOBS = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentSettings:
        """Read and validate the environment; raise ConfigError naming the variable."""
        env = os.environ if environ is None else environ
        api_url = (env.get("API_URL") or "").strip().rstrip("/")
        if not api_url:
            raise ConfigError("API_URL: required (e.g. https://api.exploop.io)")
        if not re.match(r"^https?://[^/\s]+", api_url):
            raise ConfigError(f"API_URL: expected an http(s) URL, got {api_url!r}")
        api_key = env.get("API_KEY") or None
        if api_key and not api_key.startswith("ragent_"):
            raise ConfigError("API_KEY: expected an agent key starting with 'ragent_'")
        region = env.get("REGION") or None
        if region is not None and region != "auto" and not REGION_PATTERN.match(region):
            raise ConfigError(
                f"REGION: invalid region {region!r} (lowercase letters, digits and '-')")
        if region == "auto":
            region = None
        capabilities = None
        if env.get("CAPABILITIES"):
            capabilities = tuple(c.strip() for c in env["CAPABILITIES"].split(",") if c.strip())
            unknown = [c for c in capabilities if c not in CAPABILITIES]
            if unknown or not capabilities:
                raise ConfigError(
                    f"CAPABILITIES: unknown capability {', '.join(unknown) or '(empty)'};"
                    f" valid: {', '.join(CAPABILITIES)}")
        level = (env.get("LOG_LEVEL") or "info").lower()
        if level not in _LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL: expected one of debug, info, warn, error; got {level!r}")
        max_jobs = None
        if env.get("MAX_CONCURRENT_JOBS"):
            max_jobs = _positive_int(env, "MAX_CONCURRENT_JOBS", cls.DEFAULT_MAX_JOBS)
        transport = (env.get("AGENT_TRANSPORT") or "celery").strip().lower()
        if transport not in ("celery", "http"):
            raise ConfigError(f"AGENT_TRANSPORT: expected celery or http, got {transport!r}")
        state_dir = Path(env["EXPLOOP_STATE_DIR"]) if env.get("EXPLOOP_STATE_DIR") else (
            Path(env.get("HOME") or Path.home()) / ".exploop")
        return cls(
            api_url=api_url,
            api_key=api_key,
            bootstrap_token=env.get("BOOTSTRAP_TOKEN") or None,
            region=region,
            capabilities=capabilities,
            max_concurrent_jobs=max_jobs,
            log_level=_LOG_LEVELS[level],
            heartbeat_interval=parse_duration(env.get("HEARTBEAT_INTERVAL", "30s"), "HEARTBEAT_INTERVAL"),
            poll_timeout=parse_duration(env.get("POLL_TIMEOUT", "30s"), "POLL_TIMEOUT"),
            agent_name=_agent_name(env),
            broker_url=env.get("BROKER_URL") or None,
            simulated_scan_seconds=_simulated(env),
            metrics_port=_metrics_port(env),
            memory_limit=_memory_limit(env),
            memory_warn_ratio=_ratio(env, "MEMORY_WARN_RATIO", 0.9),
            state_dir=state_dir,
            transport=transport,
        )


def _agent_name(env: Mapping[str, str]) -> str | None:
    name = (env.get("AGENT_NAME") or "").strip() or None
    if name is not None and not AGENT_NAME_PATTERN.match(name):
        raise ConfigError(f"AGENT_NAME: invalid name {name!r} (letters, digits, '.', '_' and '-', max 100)")
    return name


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def parse_size(value: str | int, name: str = "size") -> int:
    """Parse ``512m``, ``4g``, ``2GiB``, ``100k`` or a bare number of bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{name}: invalid size {value!r} (use e.g. 512m, 4g)")
        unit = (match.group(2) or "").lower()[:1]
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{name}: size must be positive, got {value!r}")
    return size


def format_size(size: int) -> str:
    """Render bytes for messages: ``512 MiB``, ``4 GiB``."""
    for unit, factor in (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class ScannerSettings:
    """How an agent runs scanners: environment variables read once when the agent starts."""

    # Directory of the OSV database (``<Ecosystem>/all.zip`` or JSON directories); SCA needs it.
    osv_db_dir: Path | None = None
    # Address-space limit (RLIMIT_AS) of every scanner process; semgrep needs about 3 GiB.
    memory_limit: int = 4 * 1024 ** 3
    # Largest repository accepted: packed history and checked-out tree, checked after fetch.
    repo_size_limit: int = 1024 ** 3
    # semgrep executable; None looks beside this Python and on PATH, "none" disables semgrep.
    semgrep_bin: str | None = None
    # Cached bare mirrors of scanned repositories (None: no cache) and their total size (LRU).
    mirror_dir: Path | None = None
    mirror_cache_size: int = 2 * 1024 ** 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ScannerSettings:
        """Read OSV_DB_DIR, SCANNER_MEMORY_LIMIT, REPO_SIZE_LIMIT, SEMGREP_BIN, MIRROR_CACHE_DIR,
        MIRROR_CACHE_SIZE (``0`` or a MIRROR_CACHE_DIR of ``none`` turns the cache off)."""
        env = os.environ if environ is None else environ
        osv = (env.get("OSV_DB_DIR") or "").strip()
        raw_size = (env.get("MIRROR_CACHE_SIZE") or "2g").strip()
        mirror_size = 0 if raw_size == "0" else parse_size(raw_size, "MIRROR_CACHE_SIZE")
        mirror = (env.get("MIRROR_CACHE_DIR") or "").strip() or str(Path("~/.exploop/mirrors"))
        mirror_dir = None if mirror.lower() == "none" or mirror_size == 0 else Path(mirror).expanduser()
        return cls(
            osv_db_dir=Path(osv).expanduser() if osv else None,
            memory_limit=parse_size(env.get("SCANNER_MEMORY_LIMIT") or "4g", "SCANNER_MEMORY_LIMIT"),
            repo_size_limit=parse_size(env.get("REPO_SIZE_LIMIT") or "1g", "REPO_SIZE_LIMIT"),
            semgrep_bin=(env.get("SEMGREP_BIN") or "").strip() or None,
            mirror_dir=mirror_dir,
            mirror_cache_size=mirror_size,
        )
