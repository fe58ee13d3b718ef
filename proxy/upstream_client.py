"""The client of every upstream call: keep-alive HTTP/1.1 connections (`proxy.http1`)
pooled per origin, with the connect and read timeouts, name resolution and TLS.

aiohttp's ClientSession builds per request what a proxy never uses (URL objects, cookie
filtering, auth and redirect handling, trace hooks, a payload registry, default headers):
it was more than half of the bare aiohttp forwarder's CPU per call. This client sends one
request, returns its answer once the head is in, and takes the connection back when the
answer is complete.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import AsyncIterable, Mapping
from typing import NamedTuple, cast
from urllib.parse import quote, urlsplit

from multidict import CIMultiDict

from proxy.http1 import Connection, Response, UpstreamError, request_head

_DNS_SECONDS = 300.0  # how long a resolved address is reused (aiohttp's ttl_dns_cache)
_NOT_IN_TARGET = re.compile(r"[^\x21-\x7e]")  # what a request line cannot carry raw


class CannotConnect(UpstreamError):
    """No connection to the upstream: the request never left."""


class ConnectTimeout(TimeoutError):
    """No connection within the connect timeout: the request never left."""


class Timeout(NamedTuple):
    connect: float | None  # resolving, connecting and the TLS handshake, together
    read: float | None  # the longest silence while an answer is awaited or read


class Origin(NamedTuple):
    host: str
    port: int
    tls: bool
    host_header: str
    literal: bool  # an IP address: nothing to resolve


def split_url(url: str) -> tuple[Origin, str]:
    """(where to connect, the request target) of an absolute http(s) URL."""
    start = url.find("://")
    slash = url.find("/", start + 3) if start >= 0 else -1
    base, target = (url, "/") if slash < 0 else (url[:slash], url[slash:])
    origin = _ORIGINS.get(base)
    if origin is None:
        origin = _origin(base)
        if len(_ORIGINS) >= 256:  # upstreams come from the config: a handful
            _ORIGINS.clear()
        _ORIGINS[base] = origin
    if _NOT_IN_TARGET.search(target):
        target = _NOT_IN_TARGET.sub(lambda m: quote(m.group(), safe=""), target)
    return origin, target


_ORIGINS: dict[str, Origin] = {}


def _origin(base: str) -> Origin:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"not an http(s) URL: {base!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    netloc = parts.netloc.rpartition("@")[2]
    try:
        ipaddress.ip_address(parts.hostname)
        literal = True
    except ValueError:
        literal = False
    return Origin(parts.hostname, port, tls, netloc, literal)


class UpstreamClient:
    """Pooled keep-alive connections per origin; idle ones are closed after `keepalive`."""

    def __init__(self, keepalive: float = 60.0, tls: ssl.SSLContext | None = None) -> None:
        self.keepalive = keepalive
        self._tls = tls
        self._tls_read: asyncio.Future[ssl.SSLContext] | None = None
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        # Resolved addresses, and until when; a look-up in flight is shared by every
        # connection that needs it (a burst of new streams resolves a name once).
        self._dns: dict[tuple[str, int], tuple[float, asyncio.Future[list[tuple[str, int]]]]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeout,
    ) -> Response:
        """Send the request; return once the answer's head is in. The caller reads the
        body, then calls `release()` (which closes a connection not read to its end)."""
        response = await self.send(method, url, headers, body, timeouts)
        try:
            await response.head()
        except BaseException:
            response.release()
            raise
        return response

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: bytes | AsyncIterable[bytes] | None,
        timeouts: Timeout,
    ) -> Response:
        """Send the request: its answer comes to the Response returned (`head()` waits
        for it). Cancelled before it returns, nothing was sent."""
        origin, target = split_url(url)
        head = request_head(method, target, origin.host_header, headers, body)
        conn = await self._acquire(origin, timeouts.connect)
        return conn.start(head, body, method, timeouts.read)

    async def tls(self) -> ssl.SSLContext:
        """The TLS context of https upstreams: the system's CAs, read once on a thread (50
        ms of file reads that would stall every call on the loop). `app` asks for it at
        startup when an upstream is https; concurrent first connections share one read."""
        if self._tls is None:
            if self._tls_read is None:
                self._tls_read = asyncio.ensure_future(
                    asyncio.to_thread(ssl.create_default_context)
                )
            self._tls = await asyncio.shield(self._tls_read)
        return self._tls

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    # -- the pool ---------------------------------------------------------------------

    async def _acquire(self, origin: Origin, connect_timeout: float | None) -> Connection:
        idle = self._idle.get(origin)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive:
                    return conn
                conn.abort()
        try:
            async with asyncio.timeout(connect_timeout):
                return await self._connect(origin)
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {origin.host}:{origin.port} within {connect_timeout:g}s"
            ) from None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        tls = await self.tls() if origin.tls else None
        error: OSError | None = None
        for host, port in await self._resolve(origin):
            try:
                transport, conn = await loop.create_connection(
                    lambda: Connection(self, origin), host, port, ssl=tls,
                    server_hostname=origin.host if tls else None,
                )  # fmt: skip
            except OSError as e:  # ssl.SSLError included: a bad certificate is no upstream
                error = e
                continue
            conn.transport = transport  # uvloop may call connection_made after this
            self._open.add(conn)
            return conn
        raise CannotConnect(f"cannot connect to {origin.host}:{origin.port}: {error}")

    async def _resolve(self, origin: Origin) -> list[tuple[str, int]]:
        if origin.literal:
            return [(origin.host, origin.port)]
        key = (origin.host, origin.port)
        loop = asyncio.get_running_loop()
        cached = self._dns.get(key)
        if cached is None or cached[0] <= loop.time():
            if len(self._dns) >= 1024:
                self._dns.clear()
            looking = asyncio.ensure_future(self._look_up(origin))
            cached = self._dns[key] = (loop.time() + _DNS_SECONDS, looking)

            def failed(f: asyncio.Future[list[tuple[str, int]]]) -> None:
                # Not kept: the next call asks again (whoever waited has the error).
                if (f.cancelled() or f.exception() is not None) and self._dns.get(key) is cached:
                    del self._dns[key]

            looking.add_done_callback(failed)
        return await asyncio.shield(cached[1])

    @staticmethod
    async def _look_up(origin: Origin) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise CannotConnect(f"cannot resolve {origin.host}: {e}") from None
        return list(dict.fromkeys((str(i[4][0]), int(i[4][1])) for i in infos))

    def park(self, conn: Connection) -> None:
        loop = conn.loop
        conn.idle_since = loop.time()
        self._idle.setdefault(cast(Origin, conn.origin), []).append(conn)
        if self._sweep is None:
            self._sweep = loop.call_later(self.keepalive, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for origin, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < self.keepalive]
            for c in idle:
                if c not in keep:
                    c.abort()
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        if self._idle:
            self._sweep = asyncio.get_running_loop().call_later(self.keepalive / 2,
                                                                self._sweep_idle)  # fmt: skip

    def forget(self, conn: Connection) -> None:
        self._open.discard(conn)
