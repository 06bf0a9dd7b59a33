"""HTTP API: one blueprint per audience (platform agents, tenants, admins).

Every error an operation can answer is documented in ``/openapi.json`` next to its
success responses, from the decorators that produce it: ``@bp.arguments`` (400, and
413 for a JSON body), the auth decorators (401, 403 for a role, 429), and
``@bp.errors(...)`` for what the view itself raises (404, 409...).
"""
from __future__ import annotations

import http
import json
from copy import deepcopy

from apispec import BasePlugin
from flask_smorest import Api as _SmorestApi
from flask_smorest import Blueprint as _SmorestBlueprint
from marshmallow import RAISE
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import RequestEntityTooLarge

from .schemas import ErrorOut

__all__ = ["Api", "Blueprint", "document"]

#: Response components for errors that carry headers (the rest are flask-smorest's,
#: one per status name, all with the error schema).
RATE_LIMITED = "RATE_LIMITED"
AUTH_REQUIRED = "AUTH_REQUIRED"
URI_TOO_LONG = "URI_TOO_LONG"


def document(func, *codes: int, security: str | None = None, role: str | None = None):
    """Add error responses (and the security scheme) to a view's OpenAPI doc; return it.

    The doc travels with the function: ``functools.wraps`` copies it onto every
    decorator above, where flask-smorest reads it. ``_apidoc`` is flask-smorest's own
    per-function store (what its public ``alt_response`` writes, but that needs a
    blueprint and our auth decorators run without one): the one private name we use,
    which is why setup.cfg pins flask-smorest's 0.x minor.
    """
    doc = deepcopy(getattr(func, "_apidoc", {}))
    responses = doc.setdefault("response", {}).setdefault("responses", {})
    for code in codes:
        name = {429: RATE_LIMITED, 401: AUTH_REQUIRED}.get(code, http.HTTPStatus(code).name)
        refs = responses.setdefault(code, [])
        if not refs:
            refs.append(name)
    if security is not None:
        manual = doc.setdefault("manual_doc", {})
        manual["security"] = [{security: []}]
        if role is not None:
            manual["x-required-role"] = role
    func._apidoc = doc
    return func


class _Parser(FlaskParser):
    # Invalid fields are a client error the spec calls 400, not webargs' 422.
    DEFAULT_VALIDATION_STATUS = 400
    # An unknown query parameter is a typo (``?stauts=failed``) that would silently
    # widen a list: refuse it, as the schemas do for unknown body fields.
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
                                   "query": RAISE, "querystring": RAISE}

    def handle_error(self, error, req, schema, *, error_status_code, error_headers):
        _authenticate_first()
        super().handle_error(error, req, schema, error_status_code=error_status_code,
                             error_headers=error_headers)

    def _handle_invalid_json_error(self, error, req, *args, **kwargs):
        _authenticate_first()
        super()._handle_invalid_json_error(error, req, *args, **kwargs)

    def _raw_load_json(self, req):
        """Strict JSON: no NaN or Infinity (they would be stored and sent back as invalid
        JSON); a body nested too deeply or with an over-long integer is invalid JSON (400),
        not a RecursionError or ValueError (500)."""
        if not is_json_request(req):
            return core.missing
        raw = req.get_data(cache=True)
        limit = req.max_content_length
        if limit is not None and req.content_length is None and len(raw) >= limit:
            # A chunked body is cut at the limit by werkzeug, silently: refuse it whole.
            raise RequestEntityTooLarge(f"request body over {limit} bytes")
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            # PostgreSQL cannot store NUL in text; a JSON string spells it \u0000.
            if b"u0000" in raw and _has_nul(data):
                raise ValueError("NUL character in a string")
            return data
        except json.JSONDecodeError:
            raise
        except (UnicodeDecodeError, RecursionError, ValueError) as exc:
            raise json.JSONDecodeError(f"invalid JSON ({exc.__class__.__name__})",
                                       doc=raw.decode("utf-8", "replace") or " ", pos=0) from None


def _authenticate_first() -> None:
    """401 before 400: an unauthenticated request learns nothing about the schema.

    Arguments are parsed before the view's auth decorator runs; only on invalid input
    (the rare path) is the credential checked here first, so valid requests pay nothing.
    The auth decorators leave their check on the view as ``exploop_auth``.
    """
    from flask import current_app, request
    check = getattr(current_app.view_functions.get(request.endpoint or ""), "exploop_auth", None)
    if check is not None:
        check()


def _has_nul(value) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Blueprint(_SmorestBlueprint):
    """flask-smorest blueprint whose validation errors answer 400, with documented errors."""

    ARGUMENTS_PARSER = _Parser()

    def arguments(self, schema, *, location="json", **kwargs):
        """As flask-smorest's, and a JSON body also documents 413 (body size limit)."""
        decorator = super().arguments(schema, location=location, **kwargs)
        if location != "json":
            return decorator
        return lambda func: document(decorator(func), 413)

    @staticmethod
    def errors(*codes: int):
        """Document the error statuses a view raises itself (``ApiError(404, ...)``)."""
        return lambda func: document(func, *codes)


class _ServerResponses(BasePlugin):
    """Responses the HTTP server may give to any operation, before the app sees it."""

    def operation_helper(self, path=None, operations=None, **kwargs):
        for operation in (operations or {}).values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"].setdefault(414, URI_TOO_LONG)


class Api(_SmorestApi):
    """flask-smorest Api whose error responses are ours: ``{"error", "detail"}``.

    No catch-all ``default`` response: every status an operation answers is listed,
    so a client (and the fuzzer) can tell an undocumented one from the contract.
    """

    DEFAULT_ERROR_RESPONSE_NAME = None
    ERROR_SCHEMA = ErrorOut

    def __init__(self, app, *, spec_kwargs: dict | None = None):
        spec_kwargs = dict(spec_kwargs or {})
        spec_kwargs["extra_plugins"] = [*spec_kwargs.get("extra_plugins", ()), _ServerResponses()]
        super().__init__(app, spec_kwargs=spec_kwargs)
        error = {"application/json": {"schema": ErrorOut}}
        self.spec.components.response(RATE_LIMITED, {
            "description": "Too many failed authentications from this client for this credential"
                           " kind; retry after the given number of seconds",
            "headers": {"Retry-After": {"description": "seconds until failures are accepted again",
                                        "schema": {"type": "integer", "minimum": 1}}},
            "content": error})
        self.spec.components.response(URI_TOO_LONG, {
            "description": "Request line over 8190 bytes (refused by the HTTP server)",
            "content": error})
        self.spec.components.response(AUTH_REQUIRED, {
            "description": "Missing, unknown or revoked credential",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            "content": error})
