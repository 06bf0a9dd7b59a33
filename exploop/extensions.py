"""Flask extensions, unbound; ``create_app`` initialises them."""
from flask_sqlalchemy import SQLAlchemy

__all__ = ["db"]

db = SQLAlchemy()
