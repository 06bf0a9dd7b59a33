"""Exploop: the platform agent fleet that runs security scans for many tenants."""

__all__ = ["create_app"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The factory pulls in Flask, SQLAlchemy and Celery (about a second). The admin CLI
    # imports this package only for its HTTP client and config helpers, and runs once per
    # command (`watch -n 5 exploop-admin ...`), so the factory loads on first use.
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
