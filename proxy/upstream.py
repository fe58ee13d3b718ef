"""Forwarding primitives: which upstream URL, which headers go on and come back."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import unquote

from aiohttp import ClientSession, ClientTimeout, DummyCookieJar, TCPConnector
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Timeouts, Upstream
from proxy.errors import ProxyFault

# RFC 9110 section 7.6.1 hop-by-hop headers, plus those the proxy must recompute.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = frozenset(HOP_BY_HOP | {"content-length", "date", "server"})
_CREDENTIALS = frozenset({"authorization", "api-key"})


def _skip(base: frozenset[str], headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """`base`, plus the headers the Connection header lists (hop-by-hop by declaration)."""
    if "Connection" not in headers:
        return base
    listed = {
        token.strip().lower()
        for value in headers.getall("Connection")
        for token in value.split(",")
        if token.strip()
    }
    return base | listed


@lru_cache(maxsize=64)
def _request_skip(drop: tuple[str, ...], credentials: bool) -> frozenset[str]:
    skip = _REQUEST_DROP | {d.lower() for d in drop}
    return skip | _CREDENTIALS if credentials else skip


@lru_cache(maxsize=4096)  # agents call a handful of paths: check each once
def check_tail(tail: str) -> str:
    """The path after /v1/, refused if it could climb out of the upstream's base path."""
    decoded = unquote(unquote(tail))
    segments = decoded.replace("\\", "/").split("/")
    if any(s in (".", "..") for s in segments) or "://" in decoded or tail.startswith("/"):
        raise ProxyFault(
            400,
            "invalid_path",
            "meterproxy: the request path contains '.' or '..' segments or a URL scheme;"
            " only paths under /v1/ are forwarded",
        )
    return tail


def upstream_url(upstream: Upstream, tail: str, query: str) -> str:
    url = f"{upstream.base_url}/{tail}"
    return f"{url}?{query}" if query else url


def request_headers(
    incoming: CIMultiDictProxy[str],
    upstream: Upstream,
    *,
    drop: Iterable[str],
    replace_credentials: bool,
    identity_encoding: bool,
) -> CIMultiDict[str]:
    """End-to-end headers on, hop-by-hop off, the upstream's key in when it has one."""
    credentials = replace_credentials or upstream.api_key is not None
    skip = _skip(_request_skip(tuple(drop), credentials), incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in skip:
            out.add(name, value)
    if upstream.api_key is not None:
        out["Authorization"] = f"Bearer {upstream.api_key}"
    if identity_encoding:
        # The proxy reads usage out of the body: ask for it uncompressed.
        out["Accept-Encoding"] = "identity"
    return out


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    skip = _skip(_RESPONSE_DROP, incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in skip:
            out.add(name, value)
    return out


@lru_cache(maxsize=16)
def client_timeout(timeouts: Timeouts, streaming: bool) -> ClientTimeout:
    return ClientTimeout(
        total=None,
        connect=timeouts.connect,
        sock_connect=timeouts.connect,
        sock_read=timeouts.stream_idle if streaming else timeouts.read,
    )


def make_session() -> ClientSession:
    """The one shared client session: pooled keep-alive connections, bodies left as sent."""
    connector = TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    return ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        # Never carry one client's upstream cookies into another client's calls.
        cookie_jar=DummyCookieJar(),
        read_bufsize=2**16,
    )
