"""What may be shown of a tenant's secrets in answers and logs (API and agents alike)."""
from __future__ import annotations

import re

__all__ = ["redact_url"]

_USERINFO = re.compile(r"(?<=://)[^/?#\s]*@")  # up to the last @ of the authority, as git reads it


def redact_url(url: str) -> str:
    """Hide credentials in a URL (``https://user:token@host/...`` -> ``https://***@host/...``)."""
    return _USERINFO.sub("***@", url)
