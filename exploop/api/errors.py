"""JSON error handlers: every error is ``{"error": "...", "detail": ...}``, never HTML."""
from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from ..core.exceptions import ApiError
from ..core.extensions import db

logger = logging.getLogger(__name__)

__all__ = ["register_error_handlers"]


def _response(status: int, message: str, detail=None, headers=None):
    response = jsonify({"error": message, "detail": detail})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _handle_api_error(exc: ApiError):
    db.session.rollback()
    return _response(exc.status, exc.message, exc.detail, exc.headers)


def _handle_http_exception(exc: HTTPException):
    detail = None
    # webargs/flask-smorest put validation messages in exc.data["messages"].
    data = getattr(exc, "data", None) or {}
    messages = data.get("messages") if isinstance(data, dict) else None
    if messages:
        # {"json": {"field": ["msg"]}} -> {"field": ["msg"]}: name the field, not the location.
        # A body that is not JSON at all: {"json": ["Invalid JSON body."]}, kept by location.
        detail = {k: v for location, loc in messages.items()
                  for k, v in (loc.items() if isinstance(loc, dict) else [(location, loc)])}
        fields = ", ".join(sorted(detail))
        message = f"invalid request: {fields}" if fields else "invalid request"
    else:
        message = exc.description if isinstance(exc.description, str) else exc.name
    if exc.code == 404 and message == HTTPException.description:
        message = "not found"
    headers = dict(exc.get_headers()) if exc.code == 405 else None
    if headers:
        headers.pop("Content-Type", None)
    return _response(exc.code or 500, message, detail, headers)


def _handle_unexpected(exc: Exception):
    db.session.rollback()
    logger.exception("unhandled error")
    return _response(500, "internal error")


def _handle_redis_down(exc: Exception):
    """Redis unreachable (leases, queues): a retryable 503, not a 500 with a traceback."""
    db.session.rollback()
    logger.error("redis unavailable: %s", exc)
    return _response(503, "service unavailable: redis is unreachable", None, {"Retry-After": "5"})


def register_error_handlers(app: Flask) -> None:
    """Register the JSON handlers (after flask-smorest, replacing its own)."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(redis.exceptions.ConnectionError, _handle_redis_down)
    app.register_error_handler(redis.exceptions.TimeoutError, _handle_redis_down)
    app.register_error_handler(Exception, _handle_unexpected)
