"""``exploop``: the server side (API, local stack, admin bootstrap)."""
from __future__ import annotations

import sys

import click

from . import __version__
from .config import ConfigError

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exploop")
def main():
    """Exploop platform server commands."""


def _app():
    from .app import create_app, init_db
    try:
        app = create_app()
        init_db(app)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return app


def _prepare_multiprocess_metrics() -> None:
    """Counters from every gunicorn worker, merged at scrape time: a fresh, empty directory
    (set PROMETHEUS_MULTIPROC_DIR to choose it), prepared before prometheus_client loads."""
    import os
    import shutil
    import tempfile
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="exploop-metrics-")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="EXPLOOP_HOST")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), envvar="EXPLOOP_PORT")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), envvar="EXPLOOP_WORKERS")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1, 1000), envvar="EXPLOOP_THREADS")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def api(host, port, workers, threads, log_level):
    """Serve the REST API (gunicorn, gthread workers)."""
    _prepare_multiprocess_metrics()
    from .logs import setup_logging
    from .server import serve
    setup_logging(log_level.upper())
    _app()  # migrate the schema once, before workers fork
    serve(host, port, workers, threads, log_level)


@main.command()
@click.option("--interval", default="2s", show_default=True, help="How often the rules run (e.g. 2s).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def controller(interval, log_level):
    """Run the controller: lease expiry, requeues, timeouts, Redis repair, fair admission."""
    import signal
    from .config import parse_duration
    from .controller import Controller
    from .logs import setup_logging
    setup_logging(log_level.upper())
    try:
        seconds = parse_duration(interval, "--interval")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    Controller(_app(), interval=seconds).run_forever(lambda: bool(stop))


@main.command("init-db")
def init_db_command():
    """Migrate the database to the latest schema revision (safe to run at every deploy)."""
    from .extensions import db
    from .schema import current_revision
    app = _app()
    with app.app_context():
        click.echo(f"database ready at revision {current_revision(db.engine)}")


@main.command("create-admin-token")
@click.option("--name", default="admin", show_default=True, help="Who the token belongs to (audit log).")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="admin", show_default=True)
def create_admin_token(name, role):
    """Create an admin token directly in the database (the first one must come from here)."""
    from .extensions import db
    from .fleet import audit
    from .models import AdminToken
    from .security import ADMIN_PREFIX, hash_token, new_token
    app = _app()
    token = new_token(ADMIN_PREFIX)
    with app.app_context():
        db.session.add(AdminToken(name=name, role=role, token_hash=hash_token(token)))
        audit("server", "create admin token", name, f"role={role}")
        db.session.commit()
    click.echo(token)
    click.echo(f"admin token for {name!r} (role {role}); shown once, store it safely", err=True)


@main.command("generate-secret-key")
def generate_secret_key():
    """Print a new random server key for EXPLOOP_SECRET_KEY (keep it out of the database and logs)."""
    from .keyring import generate_key
    click.echo(generate_key())


@main.command("rotate-secrets")
def rotate_secrets():
    """Re-encrypt every stored credential under the newest EXPLOOP_SECRET_KEY (put the new key first).

    Idempotent and resumable, safe while the API runs; afterwards the old keys can be removed.
    """
    from .vault import rotate_all
    app = _app()
    with app.app_context():
        try:
            counts = rotate_all()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"re-encrypted {counts['rotated']}, already under the newest key {counts['current']},"
               f" changed meanwhile {counts['changed_meanwhile']}")


@main.command()
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="API port.")
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--no-demo", is_flag=True, help="Do not submit the demo scan.")
def up(port, flower_port, no_demo):
    """Run the whole stack locally: Redis, API, one agent, Flower (Ctrl-C stops it)."""
    from .up import LocalStack
    sys.exit(LocalStack(api_port=port, flower_port=flower_port, demo=not no_demo).run())
