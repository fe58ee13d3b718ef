"""Forwarding primitives: which upstream URL, which headers go on and come back."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from aiohttp import ClientSession, DummyCookieJar, TCPConnector
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Timeouts, Upstream
from proxy.shapes.base import ApiShape
from proxy.upstream_client import Timeout

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


# Encodings aiohttp's server decodes before the handler reads the body: a body forwarded
# after that is decoded, and must not go out labelled as still encoded.
_DECODED_BY_SERVER = frozenset({"gzip", "deflate", "br", "zstd", "x-gzip"})


@lru_cache(maxsize=64)
def _request_skip(
    drop: tuple[str, ...], credentials: frozenset[str] | None, decoded: bool
) -> frozenset[str]:
    skip = _REQUEST_DROP | {d.lower() for d in drop}
    if credentials is not None:
        skip |= credentials
    if decoded:
        skip |= {"content-encoding"}
    return skip


def request_headers(
    incoming: CIMultiDictProxy[str],
    upstream: Upstream,
    shape: ApiShape,
    *,
    drop: Iterable[str],
    replace_credentials: bool,
    identity_encoding: bool,
) -> CIMultiDict[str]:
    """End-to-end headers on, hop-by-hop off, the upstream's key in when it has one. A
    body aiohttp decoded goes on without its Content-Encoding: header and bytes agree."""
    replacing = replace_credentials or upstream.api_key is not None
    encoding = incoming.get("Content-Encoding", "").strip().lower()
    base = _request_skip(
        tuple(drop), shape.credential_headers if replacing else None, encoding in _DECODED_BY_SERVER
    )
    skip = _skip(base, incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in skip:
            out.add(name, value)
    if upstream.api_key is not None:
        out.update(shape.credentials(upstream.api_key))
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
def client_timeout(timeouts: Timeouts, streaming: bool) -> Timeout:
    return Timeout(timeouts.connect, timeouts.stream_idle if streaming else timeouts.read)


def make_session() -> ClientSession:
    """The session of the proxy's own requests (alert webhooks): upstream calls go
    through `proxy.upstream_client`. Bodies left as sent, no cookies kept."""
    connector = TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300)
    return ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        # Never carry one client's upstream cookies into another client's calls.
        cookie_jar=DummyCookieJar(),
        read_bufsize=2**16,
    )
