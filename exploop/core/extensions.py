"""Flask extensions, unbound; ``create_app`` initialises them."""
from pathlib import Path

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

__all__ = ["db", "migrate", "Base", "MIGRATIONS_DIR", "NAMING_CONVENTION"]

#: Alembic migration scripts ship inside the package, so an installed image finds them.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Named constraints: migrations can drop or alter them by name on every backend
# (SQLite's batch mode cannot drop an unnamed constraint).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



class Base(DeclarativeBase):
    """Typed declarative base (``Mapped[...]`` columns); Flask-SQLAlchemy builds ``db.Model`` on it."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Objects stay readable after commit without a reload per attribute; code that
# needs fresh state after a concurrent change refreshes explicitly.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})

# `flask --app exploop.api.app db migrate -m "..."` writes a new revision under MIGRATIONS_DIR.
migrate = Migrate(directory=MIGRATIONS_DIR, compare_type=True)
