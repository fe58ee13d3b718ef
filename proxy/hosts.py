"""Host names and origins: which ones are this proxy's own (see `proxy.security`)."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback_host(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """`Example.COM:8787` -> `example.com`; `[::1]:8787` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@lru_cache(maxsize=1)
def _own_names() -> frozenset[str]:
    """This machine's names, for a proxy bound to all interfaces without keys."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n)


@lru_cache(maxsize=64)
def host_allowed(name: str, allowed: tuple[str, ...] | None, bind_host: str, keyed: bool) -> bool:
    if _is_ip(name):
        return True
    if allowed is not None:
        for pattern in allowed:
            p = pattern.lower()
            if p == "*" or p == name or (p.startswith(".") and name.endswith(p)):
                return True
        return False
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    if is_loopback_host(bind_host):
        return False
    return keyed or name in _own_names()


def origin_allowed(origin: str, host_header: str, allowed: tuple[str, ...]) -> bool:
    origin = origin.strip().lower()
    if origin in allowed or "*" in allowed:
        return True
    # Same origin: the page was served by this proxy (the dashboard).
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and rest == host_header.strip().lower()
