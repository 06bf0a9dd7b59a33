"""``exploop-agent``: the platform agent binary.

Reads the runbook's environment variables, gets its identity (API_KEY, a saved
key under EXPLOOP_STATE_DIR, default ~/.exploop/, one file per AGENT_NAME, or a
BOOTSTRAP_TOKEN exchanged once), asks the API for its
broker, then runs a Celery worker named after the agent on ``<cap>.<REGION>`` for
each capability, with the Lease Manager renewing its lease.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
from celery.signals import worker_process_init

from exploop import __version__
from exploop.celery_app import make_celery
from exploop.client import ApiClientError, ApiConnectionError, PlatformClient
from exploop.config import DEFAULT_KEY_FILE, AgentSettings, ConfigError, ScannerSettings, agent_key_file
from exploop.logs import setup_logging
from exploop.retry import backoff
from exploop.routing import queues_for
from exploop.vocabulary import DesiredState

from .bootsteps import DesiredStateStep, LeaseStep, StallWatchStep
from .lifeline import die_with_parent
from .tasks import register_tasks
from .workspace import sweep_workspaces, workspace_root

if TYPE_CHECKING:
    from exploop.metrics import AgentMetrics

    from .lease_manager import LeaseManager

logger = logging.getLogger("exploop.agent")

__all__ = ["main", "AgentRuntime"]


@dataclass
class AgentRuntime:
    """What the worker, its bootsteps and its tasks share (inherited by prefork children)."""

    api_url: str
    api_key: str
    name: str
    region: str
    capabilities: list[str]
    max_jobs: int
    heartbeat_interval: float
    host: str
    client: PlatformClient = field(repr=False)
    scanner_settings: ScannerSettings = field(repr=False)
    desired_state: str = DesiredState.ACTIVE
    version: str = __version__
    # Simulated scans (benchmarks and fleet tests only): sleep this long, report no findings.
    simulated_scan_seconds: float | None = None
    auth_failed: bool = False
    # This start of the agent: sent with every renewal and claim, so the API requeues at
    # once what a previous start (killed, crashed) was running.
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex)
    main_pid: int = field(default_factory=os.getpid)  # prefork children tell the main process apart
    workspace_dir: Path | None = None  # job checkouts; swept at start
    lease_manager: LeaseManager | None = None
    metrics: AgentMetrics | None = None  # main process only

    @property
    def queues(self) -> list[str]:
        return queues_for(self.capabilities, self.region)

    def status(self) -> str:
        return DesiredState.DRAINING if self.desired_state == DesiredState.DRAINING else DesiredState.ACTIVE


def _fail(message: str, code: int = 1):
    logger.error(message)
    sys.exit(code)


def _read_key(path: Path) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable saved key file=%s (%s)", path, exc)
        return None
    return saved if isinstance(saved, dict) and saved.get("api_key") else None


def _load_saved(settings: AgentSettings) -> tuple[dict, Path] | None:
    """This agent's saved key and its file: ``agents/<AGENT_NAME>.json`` (or ``agent.json``
    without AGENT_NAME); a named agent also finds its key in ``agent.json`` saved before
    keys were kept per name. A key saved for another API is not used."""
    name = settings.agent_name
    path = agent_key_file(settings.state_dir, name)
    saved = _read_key(path)
    if saved is not None and name and saved.get("name") != name:
        raise ConfigError(f"AGENT_NAME: {name!r} but {path} holds the key of agent {saved.get('name')!r};"
                          " remove that file or fix AGENT_NAME")
    if saved is None and name:
        legacy = settings.state_dir / DEFAULT_KEY_FILE
        other = _read_key(legacy)
        if other is not None and other.get("name") == name:
            saved, path = other, legacy
        elif other is not None and not settings.bootstrap_token:
            # The mistake that made a second agent on a host run as the first one.
            raise ConfigError(
                f"AGENT_NAME: no saved key for agent {name!r} in {settings.state_dir} ({legacy} is agent"
                f" {other.get('name')!r}); set BOOTSTRAP_TOKEN or API_KEY to run {name!r}, or unset"
                f" AGENT_NAME to run as {other.get('name')!r}")
    if saved is None or saved.get("api_url") != settings.api_url:
        return None
    return saved, path


def _save(settings: AgentSettings, name: str, api_key: str) -> Path:
    """Save the agent's key (0600) so a restart reuses it instead of a spent token."""
    path = agent_key_file(settings.state_dir, settings.agent_name)
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"api_url": settings.api_url, "name": name, "api_key": api_key}, handle)
    os.replace(tmp, path)
    return path


def _with_retries(call, what: str, attempts: int = 6):
    """Retry while the API is unreachable (it may still be starting)."""
    for n in range(attempts):
        try:
            return call()
        except ApiConnectionError as exc:
            logger.error("failed to connect to API %s (%s), attempt %d/%d",
                         exc.url, what, n + 1, attempts)
            if n == attempts - 1:
                raise
            time.sleep(backoff(n, base=1, cap=15))


def obtain_key(settings: AgentSettings) -> str:
    """API_KEY, else the saved key, else register with BOOTSTRAP_TOKEN (and save the key)."""
    if settings.api_key:
        return settings.api_key
    found = _load_saved(settings)
    if found:
        saved, path = found
        logger.info("using saved agent key name=%s file=%s", saved.get("name"), path)
        return saved["api_key"]
    if not settings.bootstrap_token:
        raise ConfigError("API_KEY or BOOTSTRAP_TOKEN: one is required (no saved key in "
                          f"{settings.state_dir})")
    client = PlatformClient(settings.api_url)
    # Without REGION (or REGION=auto) the API picks: the token's region, else its only one.
    fields = {"capabilities": list(settings.capabilities or AgentSettings.DEFAULT_CAPABILITIES),
              "max_jobs": settings.max_concurrent_jobs or AgentSettings.DEFAULT_MAX_JOBS,
              "version": __version__, "host": settings.host}
    if settings.agent_name:
        fields["name"] = settings.agent_name
    if settings.region:
        fields["region"] = settings.region
    try:
        reply = _with_retries(lambda: client.register(settings.bootstrap_token, **fields), "register")
    except ApiClientError as exc:
        if exc.status == 401:
            _fail(f"invalid bootstrap token: {exc.message.removeprefix('invalid bootstrap token').lstrip(': ') or 'refused'}")
        if isinstance(exc, ApiConnectionError):
            _fail(exc.message)
        _fail(f"registration refused: {exc.message} {exc.detail or ''}".strip())
    path = _save(settings, reply["name"], reply["api_key"])
    logger.info("agent registered name=%s region=%s capabilities=%s key_file=%s",
                reply["name"], reply["region"], ",".join(reply["capabilities"]), path)
    return reply["api_key"]


def build_runtime(settings: AgentSettings) -> tuple[AgentRuntime, dict]:
    """Resolve identity and broker settings from the API."""
    key = obtain_key(settings)
    client = PlatformClient(settings.api_url, key, timeout=10)
    try:
        config = _with_retries(client.config, "config")
    except ApiClientError as exc:
        if exc.status == 401:
            _fail("authentication failed: the API refused this agent's key"
                  " (deleted or disabled agent, or wrong API_KEY)")
        _fail(exc.message)
    identity = config["agent"]
    if settings.agent_name and identity["name"] != settings.agent_name:
        raise ConfigError(f"AGENT_NAME: {settings.agent_name!r} but this key (API_KEY or the saved key)"
                          f" belongs to agent {identity['name']!r}; use that agent's name or its own key")
    if settings.region and settings.region != identity["region"]:
        logger.warning("REGION=%s ignored: agent %s is registered in %s",
                       settings.region, identity["name"], identity["region"])
    runtime = AgentRuntime(
        api_url=settings.api_url, api_key=key, name=identity["name"], region=identity["region"],
        capabilities=identity["capabilities"],
        max_jobs=settings.max_concurrent_jobs or identity["max_jobs"],
        heartbeat_interval=settings.heartbeat_interval, host=settings.host,
        desired_state=identity["desired_state"], client=client,
        # Read at start so a bad SCANNER_MEMORY_LIMIT or REPO_SIZE_LIMIT stops the agent at once.
        scanner_settings=ScannerSettings.from_env(),
        simulated_scan_seconds=settings.simulated_scan_seconds)
    return runtime, config


def start_metrics(settings: AgentSettings, runtime: AgentRuntime) -> None:
    """Serve the runbook's metrics on METRICS_PORT (before the pool forks)."""
    from prometheus_client import start_http_server

    from exploop.metrics import AgentMetrics
    metrics = AgentMetrics(runtime.name, runtime.region)
    runtime.metrics = metrics
    metrics.max_jobs.set(runtime.max_jobs)

    def lease_valid() -> float:
        manager = runtime.lease_manager
        return 1.0 if manager is not None and manager.lease_remaining() > 0 and not runtime.auth_failed else 0.0

    metrics.status.set_function(lease_valid)
    metrics.draining.set_function(lambda: 1.0 if runtime.desired_state == DesiredState.DRAINING else 0.0)
    metrics.disabled.set_function(
        lambda: 1.0 if getattr(runtime.lease_manager, "disabled", False) else 0.0)
    metrics.lease_ttl.set_function(
        lambda: runtime.lease_manager.lease_remaining() if runtime.lease_manager else 0.0)
    from .bootsteps import running_jobs
    metrics.jobs_running.set_function(lambda: float(len(running_jobs())))
    if settings.metrics_port is None:
        return
    try:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"METRICS_PORT: cannot listen on {settings.metrics_port}: {exc.strerror}") from None
    logger.info("metrics on :%d/metrics", settings.metrics_port)


def sweep(runtime: AgentRuntime) -> None:
    """Remove checkouts a previous run of this agent left (it was killed mid-job)."""
    runtime.workspace_dir = workspace_root(runtime.name)
    try:
        removed = sweep_workspaces(runtime.workspace_dir)
    except OSError as exc:
        raise ConfigError(f"TMPDIR: cannot prepare {runtime.workspace_dir}: {exc.strerror}") from None
    if removed:
        logger.warning("removed %d checkout(s) left by a previous run dir=%s", removed, runtime.workspace_dir)


def run(settings: AgentSettings) -> int:
    runtime, config = build_runtime(settings)
    sweep(runtime)
    start_metrics(settings, runtime)
    if settings.transport == "http":  # HTTPS only: no broker connection at all
        from .http_agent import run_http
        return run_http(settings, runtime)
    broker_url = settings.broker_url or config["broker_url"]
    # The API hands out every transport option kombu needs (key prefix, Sentinel master name);
    # an older API only the prefix.
    options = dict(config.get("broker_transport_options") or {})
    if config.get("broker_key_prefix"):
        options.setdefault("global_keyprefix", config["broker_key_prefix"])
    options.pop("visibility_timeout", None)
    overrides: dict = {"broker_transport_options": options} if options else {}
    if broker_url.startswith("sentinel://"):
        # kombu's sentinel transport cannot re-create the remote-control (pub/sub) connection
        # after a failover: the worker dies with "Unrecoverable error: AttributeError". Without
        # remote control, drain and uncordon apply at the next lease renewal instead of at once.
        overrides["worker_enable_remote_control"] = False
        logger.info("sentinel broker: remote control off; drain applies at the next lease renewal")
    app = make_celery(broker_url, queues=runtime.queues, visibility_timeout=config["visibility_timeout"],
                      overrides=overrides or None)
    app.exploop_runtime = runtime
    app.exploop_settings = settings
    register_tasks(app)
    app.steps["worker"].add(LeaseStep)
    # Pool children die with the main process (kill -9 included), and their scanners with them.
    worker_process_init.connect(lambda **kw: die_with_parent(runtime.main_pid), weak=False)
    app.steps["consumer"].add(DesiredStateStep)
    app.steps["consumer"].add(StallWatchStep)
    nodename = f"{runtime.name}@{runtime.host}"
    logger.info("starting agent name=%s region=%s queues=%s concurrency=%d desired_state=%s incarnation=%s",
                runtime.name, runtime.region, ",".join(runtime.queues), runtime.max_jobs,
                runtime.desired_state, runtime.incarnation)
    worker = app.Worker(hostname=nodename, queues=runtime.queues, concurrency=runtime.max_jobs,
                        pool_cls="prefork", loglevel=settings.log_level, without_mingle=True,
                        without_gossip=True, optimization="fair", quiet=True)
    try:
        worker.start()
    finally:
        manager = runtime.lease_manager
        if manager is not None:
            # Running jobs have finished: drop the lease so status turns offline at once.
            manager.stop(release=not runtime.auth_failed)
    if runtime.auth_failed or getattr(manager, "auth_failed", False):
        return 1
    logger.info("agent stopped name=%s", runtime.name)
    return worker.exitcode or 0


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exploop-agent")
@click.pass_context
def main(ctx):
    """Exploop platform agent. Configured by environment variables (see the runbook):
    API_URL, API_KEY or BOOTSTRAP_TOKEN, REGION, CAPABILITIES, MAX_CONCURRENT_JOBS,
    LOG_LEVEL, HEARTBEAT_INTERVAL, POLL_TIMEOUT, AGENT_TRANSPORT (celery | http)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        settings = AgentSettings.from_env()
    except ConfigError as exc:
        click.echo(f"exploop-agent: {exc}", err=True)
        sys.exit(2)
    setup_logging(settings.log_level)
    try:
        sys.exit(run(settings))
    except ConfigError as exc:
        click.echo(f"exploop-agent: {exc}", err=True)
        sys.exit(2)


@main.command("osv-sync")
@click.option("--db-dir", envvar="OSV_DB_DIR", show_envvar=True, required=True,
              type=click.Path(file_okay=False),
              help="Where the database lives (OSV_DB_DIR).")
@click.option("--base-url", envvar="OSV_BASE_URL", show_default=True,
              default="https://osv-vulnerabilities.storage.googleapis.com",
              help="Where <Ecosystem>/all.zip archives are served (OSV_BASE_URL).")
@click.option("--ecosystem", "ecosystems", multiple=True, default=("PyPI", "npm", "Go"),
              show_default=True, help="Ecosystem to download (repeatable).")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Network timeout per request, in seconds.")
def osv_sync(db_dir, base_url, ecosystems, timeout):
    """Download OSV advisories (per-ecosystem all.zip) into OSV_DB_DIR for SCA scans."""
    from .osv_sync import sync
    try:
        results, errors = sync(base_url, Path(db_dir), list(ecosystems), timeout)
    except OSError as exc:
        raise click.ClickException(f"osv-sync failed: {db_dir}: {exc.strerror}") from None
    for result in results:
        state = "downloaded" if result.updated else "already current"
        click.echo(f"{result.ecosystem}: {result.records} advisories, "
                   f"{result.size / 1048576:.1f} MiB ({state})")
    if errors:
        raise click.ClickException("osv-sync failed: " + "; ".join(errors))
