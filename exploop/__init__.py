"""Exploop: the platform agent fleet that runs security scans for many tenants."""

__version__ = "0.1.0"
