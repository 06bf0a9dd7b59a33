"""Alembic environment: the Flask app's engine and the models' metadata.

Run through ``exploop.core.migrate.upgrade`` (every ``exploop api|controller|init-db``
start, holding the migration lock) or ``flask --app exploop.api.app db ...`` for development.
Logging is left to the process that runs us: no ``fileConfig`` here.
"""
from __future__ import annotations

import logging

from alembic import context
from flask import current_app

import exploop.core.models  # noqa: F401  every table registered on the metadata

config = context.config
logger = logging.getLogger("alembic.env")


def _migrate_state():
    return current_app.extensions["migrate"]


def run_migrations_offline() -> None:
    """Emit SQL for the configured database instead of running it (``--sql``)."""
    state = _migrate_state()
    context.configure(url=state.db.engine.url.render_as_string(hide_password=False),
                      target_metadata=state.db.metadata, literal_binds=True,
                      **state.configure_args)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a connection of the app's engine, in one transaction."""
    state = _migrate_state()

    def skip_empty_revisions(context, revision, directives):
        # `db migrate` with no model change writes no empty revision file.
        if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
            directives[:] = []
            logger.info("No changes in schema detected.")

    options = dict(state.configure_args)
    options.setdefault("process_revision_directives", skip_empty_revisions)
    with state.db.engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode rebuilds SQLite tables (copy, drop, rename): with foreign keys
            # enforced, dropping a referenced table fails. Off for the migration only.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # end the autobegun transaction: Alembic must own its own
        try:
            context.configure(connection=connection, target_metadata=state.db.metadata, **options)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
