"""Flask extensions, unbound; ``create_app`` initialises them."""
from flask_sqlalchemy import SQLAlchemy

__all__ = ["db"]

# Objects stay readable after commit without a reload per attribute; code that
# needs fresh state after a concurrent change refreshes explicitly.
db = SQLAlchemy(session_options={"expire_on_commit": False})
