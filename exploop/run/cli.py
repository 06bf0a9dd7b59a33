"""``exploop``: the server side (API, local stack, admin bootstrap)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import click

from .. import __version__
from ..config import ConfigError

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exploop")
def main():
    """Exploop platform server commands."""


def _app(config: dict | None = None, check_keys: bool = True):
    # Lazy (as every server import in this module): `exploop --help` and `exploop up` answer
    # without loading Flask, SQLAlchemy and Celery, and prometheus_client is first imported
    # after `_prepare_multiprocess_metrics` set PROMETHEUS_MULTIPROC_DIR (it reads it at import).
    from ..api.app import create_app, init_db
    try:
        app = create_app(config)
        init_db(app, check_keys)  # also refuses to start when stored credentials no configured key opens
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return app


def _prepare_multiprocess_metrics() -> str | None:
    """Counters from every gunicorn worker, merged at scrape time: a fresh, empty directory
    (set PROMETHEUS_MULTIPROC_DIR to choose it), prepared before prometheus_client loads.

    Returns the directory when it is a temporary one of ours, to remove at exit.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        return None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="exploop-metrics-")
    return os.environ["PROMETHEUS_MULTIPROC_DIR"]


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="EXPLOOP_HOST")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), envvar="EXPLOOP_PORT")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), envvar="EXPLOOP_WORKERS")
@click.option("--threads", default=16, show_default=True, type=click.IntRange(1, 1000), envvar="EXPLOOP_THREADS")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def api(host, port, workers, threads, log_level):
    """Serve the REST API (gunicorn, gthread workers)."""
    temporary = _prepare_multiprocess_metrics()
    try:
        from ..logs import setup_logging
        from .gunicorn import serve
        setup_logging(log_level.upper())
        _app()  # migrate the schema once, before workers fork
        serve(host, port, workers, threads, log_level)
    finally:
        # gunicorn exits through SystemExit on SIGTERM/SIGINT: the directory goes with it.
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


@main.command()
@click.option("--interval", default="2s", show_default=True, help="How often the rules run (e.g. 2s).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def controller(interval, log_level):
    """Run the controller: lease expiry, requeues, timeouts, Redis repair, fair admission."""
    import signal

    from ..config import parse_duration
    from ..core.controller import Controller
    from ..logs import setup_logging
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
    from ..core.extensions import db
    from ..core.migrate import current_revision
    app = _app()
    with app.app_context():
        click.echo(f"database ready at revision {current_revision(db.engine)}")


def _admin_database() -> dict | None:
    """The database ``create-admin-token`` writes to, when nothing names one.

    With EXPLOOP_SQLALCHEMY_DATABASE_URI or EXPLOOP_DATA_DIR set, those (None here). Else
    ``./.exploop/exploop.db`` if it exists, else the database of the last ``exploop up``
    (``~/.exploop/local-stack.json``): a token written to a fresh database in whatever
    directory the shell is in would be refused by the running API.
    """
    import json
    import os
    from pathlib import Path

    from ..config import data_dir, local_stack_record
    if os.environ.get("EXPLOOP_SQLALCHEMY_DATABASE_URI") or os.environ.get("EXPLOOP_DATA_DIR"):
        return None
    here = data_dir() / "exploop.db"
    if here.exists():
        return None
    try:
        recorded = Path(json.loads(local_stack_record().read_text())["data_dir"]) / "exploop.db"
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded is not None and recorded.exists():
        return {"SQLALCHEMY_DATABASE_URI": f"sqlite:///{recorded}"}
    raise click.ClickException(
        f"no database at {here}: run this in the directory of `exploop up` (or while one runs),"
        " or set EXPLOOP_SQLALCHEMY_DATABASE_URI to the API's database")


@main.command("create-admin-token")
@click.option("--name", default="admin", show_default=True, help="Who the token belongs to (audit log).")
@click.option("--role", type=click.Choice(["admin", "viewer"]), default="admin", show_default=True)
def create_admin_token(name, role):
    """Create an admin token directly in the database (the first one must come from here).

    The database: EXPLOOP_SQLALCHEMY_DATABASE_URI, else .exploop/exploop.db here, else the
    one of the last `exploop up`; the command says which it used.
    """
    from sqlalchemy.engine import make_url

    from ..core.extensions import db
    from ..core.fleet import audit
    from ..core.models import AdminToken
    from ..core.security import ADMIN_PREFIX, hash_token, new_token
    app = _app(_admin_database(), check_keys=False)  # an admin token needs no server key
    token = new_token(ADMIN_PREFIX)
    with app.app_context():
        db.session.add(AdminToken(name=name, role=role, token_hash=hash_token(token)))
        audit("server", "create admin token", name, f"role={role}")
        db.session.commit()
    where = make_url(app.config["SQLALCHEMY_DATABASE_URI"]).render_as_string(hide_password=True)
    click.echo(token)
    click.echo(f"admin token for {name!r} (role {role}) in {where}; shown once, store it safely", err=True)


@main.command("generate-secret-key")
def generate_secret_key():
    """Print a new random server key for EXPLOOP_SECRET_KEY (keep it out of the database and logs)."""
    from ..core.keyring import generate_key
    click.echo(generate_key())


@main.command("rotate-secrets")
def rotate_secrets():
    """Re-encrypt every stored credential under the newest EXPLOOP_SECRET_KEY (put the new key first).

    Idempotent and resumable, safe while the API runs; afterwards the old keys can be removed.
    """
    from ..core.vault import rotate_all
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
    from .local_stack import LocalStack
    sys.exit(LocalStack(api_port=port, flower_port=flower_port, demo=not no_demo).run())
