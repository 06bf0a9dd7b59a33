"""Domain errors that carry the HTTP status and the message a user sees."""
from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as ``{"error": message, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, message: str, detail=None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers or {}
