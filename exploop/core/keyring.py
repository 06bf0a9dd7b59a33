"""The server key: authenticated encryption of what the database must not hold in clear.

``EXPLOOP_SECRET_KEY`` (or the file named by ``EXPLOOP_SECRET_KEY_FILE``) holds one or more
Fernet keys, newest first, separated by commas or newlines. The newest encrypts; every key
decrypts, so a new key can be put in front while old ciphertexts are still readable, and
``exploop rotate-secrets`` re-encrypts them under the newest. The keys live only in the
environment or that file: never in the database, never in a log line or an error.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..config import ConfigError

__all__ = ["Keyring", "load_keyring", "generate_key", "keyed_hash", "InvalidToken"]

_SEPARATORS = re.compile(r"[\s,]+")


def generate_key() -> str:
    """A new random key in the form EXPLOOP_SECRET_KEY takes (``exploop generate-secret-key``)."""
    return Fernet.generate_key().decode()


class Keyring:
    """The server's keys: the first encrypts, all decrypt."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._primary = Fernet(keys[0])
        self._all = MultiFernet([Fernet(k) for k in keys])
        self.size = len(keys)

    def encrypt(self, text: str) -> str:
        """Seal ``text`` under the newest key (AES-128-CBC + HMAC-SHA256, with a timestamp)."""
        return self._primary.encrypt(text.encode()).decode()

    def decrypt(self, token: str) -> str:
        """Open a ciphertext made with any of the keys; raises InvalidToken otherwise."""
        return self._all.decrypt(token.encode()).decode()

    def is_current(self, token: str) -> bool:
        """Was ``token`` made with the newest key (nothing for rotation to do)?"""
        try:
            self._primary.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def rotate(self, token: str) -> str:
        """The same plaintext sealed under the newest key."""
        return self._all.rotate(token.encode()).decode()

    def new_tenant_key(self) -> str:
        """A fresh per-tenant fingerprint key, sealed for storage in the tenant's row."""
        return self.encrypt(secrets.token_hex(32))


def keyed_hash(key: str, value: str) -> str:
    """HMAC-SHA256 of ``value`` under a tenant's fingerprint key (hex)."""
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def _split(raw: str) -> list[str]:
    return [k for k in _SEPARATORS.split(raw.strip()) if k]


def load_keyring(config: Mapping) -> Keyring | None:
    """The keyring from SECRET_KEY or SECRET_KEY_FILE (Flask config keys), or None when neither is set.

    A malformed key raises ConfigError naming the setting and the key's position, never its value.
    """
    raw, name = config.get("SECRET_KEY"), "EXPLOOP_SECRET_KEY"
    path = config.get("SECRET_KEY_FILE")
    if raw and path:
        raise ConfigError("EXPLOOP_SECRET_KEY and EXPLOOP_SECRET_KEY_FILE are both set; use one")
    if path:
        name = "EXPLOOP_SECRET_KEY_FILE"
        try:
            raw = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    if not raw:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode()
    keys = _split(str(raw))
    if not keys:
        raise ConfigError(f"{name}: no key found")
    for position, key in enumerate(keys, 1):
        try:
            Fernet(key)
        except ValueError:
            raise ConfigError(f"{name}: key {position} is not a Fernet key (32 url-safe base64-encoded"
                              " bytes); make one with `exploop generate-secret-key`") from None
    return Keyring(keys)
