"""What every lockfile parser produces: packages with exact versions, and what it could not read."""
from __future__ import annotations

from dataclasses import dataclass

from .common import ScanError

__all__ = ["Package", "LockfileError"]


@dataclass(frozen=True)
class Package:
    """One installed package, where the lockfile pins it.

    ``instance`` tells apart several copies of one package in one lockfile (npm's nested
    installs: the install path; yarn: the descriptors); it never holds the version alone
    when a version-independent identity exists, so a plain version bump keeps it.
    """

    ecosystem: str
    name: str
    version: str
    path: str
    line: int
    instance: str = ""


class LockfileError(ScanError):
    """A lockfile that cannot be read; the message names it (repository-relative)."""
