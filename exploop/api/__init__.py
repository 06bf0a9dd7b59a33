"""HTTP API: one blueprint per audience (platform agents, tenants, admins)."""
from flask_smorest import Blueprint as _SmorestBlueprint
from webargs.flaskparser import FlaskParser

__all__ = ["Blueprint"]


class _Parser(FlaskParser):
    # Invalid fields are a client error the spec calls 400, not webargs' 422.
    DEFAULT_VALIDATION_STATUS = 400


class Blueprint(_SmorestBlueprint):
    """flask-smorest blueprint whose validation errors answer 400."""

    ARGUMENTS_PARSER = _Parser()
