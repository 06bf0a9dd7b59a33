"""Where ``exploop-admin`` sends its requests, and with which token.

Each value comes from the first of: the command-line option (``--api-url``,
``--token``), its environment variable (``EXPLOOP_API_URL``,
``EXPLOOP_ADMIN_TOKEN``), the selected context of ``~/.exploop/config``
(``--context`` / ``EXPLOOP_CONTEXT``, else the file's ``current-context``), and
for the URL only, the local default ``http://127.0.0.1:8080``.

The config file is YAML, kubeconfig style::

    current-context: prod
    contexts:
      prod:
        api_url: https://api.exploop.io
        token: radmin_...
      staging:
        api_url: https://api.staging.exploop.io
        token: radmin_...

or INI, one section per context and ``current-context`` in ``[exploop]``::

    [exploop]
    current-context = prod

    [context prod]
    api_url = https://api.exploop.io
    token = radmin_...
"""
from __future__ import annotations

import configparser
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["ConfigFileError", "Target", "config_path", "load_contexts", "resolve", "DEFAULT_API_URL"]

#: Where ``exploop api`` listens unless told otherwise.
DEFAULT_API_URL = "http://127.0.0.1:8080"

_URL = re.compile(r"^https?://[^/\s]+")


class ConfigFileError(Exception):
    """The config file or the chosen context cannot be used; the message says why."""


@dataclass(frozen=True)
class Target:
    """The resolved API URL and admin token, and where the token came from."""

    api_url: str
    token: str | None
    context: str | None
    token_source: str | None


def config_path() -> Path:
    """``$EXPLOOP_CONFIG``, else ``~/.exploop/config``."""
    explicit = os.environ.get("EXPLOOP_CONFIG")
    return Path(explicit).expanduser() if explicit else Path.home() / ".exploop" / "config"


def _context_fields(name: str, raw, path: Path) -> dict:
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: context {name!r} must be a mapping with api_url and token")
    values = {str(k).replace("-", "_").lower(): v for k, v in raw.items()}
    unknown = sorted(set(values) - {"api_url", "token"})
    if unknown:
        raise ConfigFileError(f"{path}: context {name!r}: unknown key {unknown[0]!r}"
                              " (expected api_url, token)")
    return {k: str(v) for k, v in values.items() if v is not None}


def _parse_yaml(text: str, path: Path) -> tuple[str | None, dict[str, dict]]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigFileError(f"{path}: invalid YAML{where}") from None
    if data is None:
        return None, {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping with current-context and contexts")
    if "contexts" not in data:  # a single unnamed context: api_url and token at the top
        return "default", {"default": _context_fields("default", data, path)}
    contexts = data["contexts"] or {}
    if isinstance(contexts, list):  # kubeconfig's list form: [{name: prod, api_url: ...}]
        named = {}
        for entry in contexts:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ConfigFileError(f"{path}: each entry of contexts needs a name")
            entry = dict(entry)
            named[str(entry.pop("name"))] = entry
        contexts = named
    if not isinstance(contexts, dict):
        raise ConfigFileError(f"{path}: contexts must be a mapping of name to api_url and token")
    current = data.get("current-context", data.get("current_context"))
    return (str(current) if current else None,
            {str(name): _context_fields(str(name), raw, path) for name, raw in contexts.items()})


def _parse_ini(text: str, path: Path) -> tuple[str | None, dict[str, dict]]:
    parser = configparser.ConfigParser(interpolation=None, default_section="__defaults__")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise ConfigFileError(f"{path}: invalid INI: {exc.message.splitlines()[0]}") from None
    current = None
    contexts = {}
    for section in parser.sections():
        if section == "exploop":
            current = parser.get(section, "current-context", fallback=None) or \
                parser.get(section, "current_context", fallback=None)
            continue
        name = section.removeprefix("context ").strip().strip('"')
        contexts[name] = _context_fields(name, dict(parser.items(section)), path)
    if current is None and list(contexts) == ["default"]:
        current = "default"
    return current, contexts


def load_contexts(path: Path) -> tuple[str | None, dict[str, dict]]:
    """Return ``(current_context, {name: {"api_url": ..., "token": ...}})``; empty if no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, {}
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc.strerror}") from None
    first = next((line.strip() for line in text.splitlines()
                  if line.strip() and not line.lstrip().startswith(("#", ";"))), "")
    return _parse_ini(text, path) if first.startswith("[") else _parse_yaml(text, path)


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False


def resolve(api_url: str | None, token: str | None, context: str | None,
            warn=lambda message: None) -> Target:
    """Combine options/environment with the config file (read only when needed)."""
    token_source = "--token/EXPLOOP_ADMIN_TOKEN" if token else None
    chosen = None
    if context or not (api_url and token):
        path = config_path()
        current, contexts = load_contexts(path)
        name = context or current
        if name is None and len(contexts) == 1:
            name = next(iter(contexts))
        if name is not None:
            if name not in contexts:
                known = ", ".join(sorted(contexts)) or "none"
                raise ConfigFileError(f"context {name!r} not found in {path} (contexts: {known})")
            chosen = name
            values = contexts[name]
            if not api_url and values.get("api_url"):
                api_url = values["api_url"]
            if not token and values.get("token"):
                token = values["token"]
                token_source = f"context {name!r} in {path}"
                if _readable_by_others(path):
                    warn(f"warning: {path} holds a token and is readable by others; chmod 600 it")
    api_url = (api_url or DEFAULT_API_URL).strip().rstrip("/")
    if not _URL.match(api_url):
        raise ConfigFileError(f"invalid API URL {api_url!r}: expected http(s)://host[:port]")
    return Target(api_url=api_url, token=token or None, context=chosen, token_source=token_source)
