"""Where repositories may be fetched from: the destination policy, applied after DNS resolution.

A tenant names the repository URL, and an agent connects there from inside the fleet's
network. By default a destination is refused when any address its host resolves to is
loopback, private, link-local, shared (CGNAT), reserved, multicast, unspecified or a cloud
metadata address. Operators add exceptions (EXPLOOP_REPO_DESTINATIONS_ALLOW: host names,
``*.suffix`` patterns and CIDRs) and refusals (EXPLOOP_REPO_DESTINATIONS_DENY, same forms,
which win over everything). The API checks at submit; the agent checks again right before
the fetch and pins git to the addresses it checked, so a DNS answer that changes in between
(rebinding) is not followed. A refusal reads the same whatever the reason, so it never
tells a tenant what the fleet's network looks like.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

from .config import ConfigError

__all__ = ["DestinationPolicy", "DestinationRefused", "repo_host", "resolve_for_submit", "METADATA_ADDRESSES"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Cloud instance metadata services (AWS, GCP, Azure, OpenStack; AWS IPv6, ECS; Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200"))
_SCP_LIKE = re.compile(r"^(?:[^@/:\s]+@)?(\[[^\]]+\]|[^:/\s]+):")
_DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
#: Longest a DNS lookup may hold a submission or a fetch.
RESOLVE_TIMEOUT = 5.0
_resolver_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="exploop-resolve")


class DestinationRefused(Exception):
    """The repository's host is not an allowed destination (the message is safe to show)."""


def repo_host(url: str) -> tuple[str, int] | None:
    """``(host, port)`` a repository URL connects to; None for a local path or file:// URL."""
    if "://" not in url:
        scp = _SCP_LIKE.match(url)  # git@host:org/repo.git
        return (scp.group(1).strip("[]").lower(), 22) if scp else None
    parts = urlsplit(url)
    if parts.scheme in ("", "file"):
        return None
    try:
        port = parts.port
    except ValueError:
        raise DestinationRefused("repository URL has an invalid port") from None
    if not parts.hostname:
        raise DestinationRefused("repository URL has no host")
    return parts.hostname.lower(), port or _DEFAULT_PORTS.get(parts.scheme, 443)


def _special(address: IPAddress) -> bool:
    """Addresses a tenant's repository may not be on unless allowed: anything not global."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return (not address.is_global or address.is_multicast or address.is_unspecified
            or address in METADATA_ADDRESSES)


def _host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def _in(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(address in n or (mapped is not None and mapped in n) for n in networks)


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (empty when it does not), bounded by RESOLVE_TIMEOUT."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    future = _resolver_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=RESOLVE_TIMEOUT)
    except (OSError, UnicodeError, FutureTimeout):
        return []
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


#: Submit-time lookups are remembered this long: a burst of submissions for one host costs one
#: lookup. Never used by agents, whose check right before the fetch is always fresh.
SUBMIT_CACHE_SECONDS = 30.0
_SUBMIT_CACHE_SIZE = 1024
_submit_cache: dict[tuple[str, int], tuple[float, list[IPAddress]]] = {}
_submit_cache_lock = threading.Lock()


def resolve_for_submit(host: str, port: int) -> list[IPAddress]:
    """:func:`_resolve` with a short per-process cache, for the API's check at submit."""
    now = time.monotonic()
    with _submit_cache_lock:
        hit = _submit_cache.get((host, port))
    if hit is not None and hit[0] > now:
        return hit[1]
    addresses = _resolve(host, port)
    with _submit_cache_lock:
        if len(_submit_cache) >= _SUBMIT_CACHE_SIZE:
            _submit_cache.clear()
        _submit_cache[(host, port)] = (now + SUBMIT_CACHE_SECONDS, addresses)
    return addresses


def _parse(raw: str | None, name: str) -> tuple[tuple[str, ...], tuple[IPNetwork, ...]]:
    hosts: list[str] = []
    networks: list[IPNetwork] = []
    for entry in re.split(r"[\s,]+", (raw or "").strip()):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", entry):
            raise ConfigError(f"{name}: {entry!r} is neither a host name, a *.suffix pattern nor a CIDR")
        hosts.append(entry.lower())
    return tuple(hosts), tuple(networks)


@dataclass(frozen=True)
class DestinationPolicy:
    """The operator's exceptions to the default rule, and the check itself."""

    allow_hosts: tuple[str, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()
    deny_hosts: tuple[str, ...] = ()
    deny_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allow: str | None, deny: str | None) -> DestinationPolicy:
        """From the two comma-separated lists; a malformed entry raises ConfigError naming its list."""
        allow_hosts, allow_networks = _parse(allow, "EXPLOOP_REPO_DESTINATIONS_ALLOW")
        deny_hosts, deny_networks = _parse(deny, "EXPLOOP_REPO_DESTINATIONS_DENY")
        return cls(allow_hosts, allow_networks, deny_hosts, deny_networks)

    @classmethod
    def from_config(cls, config: Mapping) -> DestinationPolicy:
        """The API's policy (REPO_DESTINATIONS_ALLOW and _DENY Flask config keys)."""
        return cls.parse(config.get("REPO_DESTINATIONS_ALLOW"), config.get("REPO_DESTINATIONS_DENY"))

    def to_dict(self) -> dict[str, list[str]]:
        """The form handed to agents in a claim answer."""
        return {"allow": [*self.allow_hosts, *map(str, self.allow_networks)],
                "deny": [*self.deny_hosts, *map(str, self.deny_networks)]}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> DestinationPolicy:
        data = data or {}
        return cls.parse(",".join(data.get("allow") or ()), ",".join(data.get("deny") or ()))

    def check(self, host: str, port: int, *, unresolved_ok: bool = False,
              resolve: Callable[[str, int], list[IPAddress]] = _resolve) -> list[IPAddress]:
        """The addresses ``host`` may be reached at; raises DestinationRefused otherwise.

        ``unresolved_ok``: a host that does not resolve here passes (the API's resolver is
        not the agents'; the agent checks again before it fetches).
        """
        refused = DestinationRefused(
            f"repository host {host!r} is refused by the destination policy: repositories must be on"
            " public addresses, or on hosts the operator allows")
        host = host.lower().rstrip(".")
        if _host_matches(host, self.deny_hosts):
            raise refused
        named = _host_matches(host, self.allow_hosts)
        addresses = resolve(host, port)
        if not addresses:
            if unresolved_ok:
                return []
            raise refused
        for address in addresses:
            if _in(address, self.deny_networks):
                raise refused
            if not (named or _in(address, self.allow_networks)) and _special(address):
                raise refused
        return addresses
