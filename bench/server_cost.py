"""`python -m bench.server_cost`: what aiohttp's server costs a forwarded call.

Two throwaway forwarders share one minimal keep-alive client (httptools) and differ only
in their server: aiohttp's (`web.Application`, one catch-all route, as the floor and
meterproxy use it) or a bare httptools protocol (no request object, no router, no
response object: the least an HTTP/1.1 server can do). Each is pinned to core 0 and
loaded by wrk (32 connections, JSON) from core 1, in alternating rounds; the table gives
each one's CPU per call. The difference bounds what any server of meterproxy's own could
save: it would still need much of what aiohttp does (limits, timeouts, keep-alive rules,
a request object for the handlers). Neither forwarder is fit for anything but this.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

import httptools

from bench.forwarder import HOP

_HOP_BYTES = {h.encode() for h in HOP}


class _Upstream(asyncio.Protocol):
    """One keep-alive connection: a request written, its answer parsed whole."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the upstream closed the connection"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None:
            self.waiter.set_result(None)
            self.waiter = None


class _Pool:
    def __init__(self, port: int) -> None:
        self.port = port
        self.free: list[_Upstream] = []

    async def request(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        loop = asyncio.get_running_loop()
        if self.free:
            conn = self.free.pop()
        else:
            _, conn = await loop.create_connection(_Upstream, "127.0.0.1", self.port)
        conn.headers, conn.body = [], []
        conn.waiter = loop.create_future()
        head = [f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        assert conn.transport is not None
        conn.transport.write("".join(head).encode("latin-1") + b"\r\n" + body)
        await conn.waiter
        self.free.append(conn)
        kept = [(k.decode(), v.decode()) for k, v in conn.headers if k.lower() not in _HOP_BYTES]
        return conn.status, kept, b"".join(conn.body)


def serve_aiohttp(port: int, upstream: int) -> None:
    from aiohttp import web

    pool = _Pool(upstream)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        status, out, data = await pool.request(request.method, request.path_qs, headers, body)
        return web.Response(status=status, body=data, headers=dict(out))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, backlog=4096,
                loop=_new_loop(), print=lambda *_: None)  # fmt: skip


class _Bare(asyncio.Protocol):
    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.headers, self.body = [], []

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        headers = [(k.decode(), v.decode()) for k, v in self.headers if k.lower() not in _HOP_BYTES]
        asyncio.get_running_loop().create_task(
            self.answer(method, self.url.decode(), headers, b"".join(self.body),
                        self.parser.should_keep_alive())
        )  # fmt: skip

    async def answer(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, keep: bool
    ) -> None:
        status, out, data = await self.pool.request(method, path, headers, body)
        head = [f"HTTP/1.1 {status} OK\r\n", *(f"{k}: {v}\r\n" for k, v in out)]
        head.append(f"Content-Length: {len(data)}\r\n\r\n")
        assert self.transport is not None
        if self.transport.is_closing():  # wrk hung up at the end of its run
            return
        self.transport.write("".join(head).encode("latin-1") + data)
        if not keep:
            self.transport.close()


def serve_bare(port: int, upstream: int) -> None:
    async def serve() -> None:
        pool = _Pool(upstream)
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _Bare(pool), "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    _new_loop().run_until_complete(serve())


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def measure(rounds: int, seconds: int) -> None:
    from bench.__main__ import SCENARIOS, Process, free_ports, pinned, wrk

    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (apt-get install wrk)")
    up, port = free_ports(2)
    work = Path(tempfile.mkdtemp(prefix="meterproxy-server-cost-"))
    py = sys.executable
    body = SCENARIOS["json"]
    upstream = Process(
        "fake upstream", pinned(1, [py, "-m", "bench.fake_upstream", "--port", str(up)]), up,
        work / "upstream.log",
    )  # fmt: skip
    cost: dict[str, list[float]] = {"aiohttp": [], "bare": []}
    try:
        upstream.wait_ready()
        for rnd in range(rounds):
            for server, costs in cost.items():
                argv = [py, "-m", "bench.server_cost", "--serve", server, "--port", str(port),
                        "--upstream", str(up)]  # fmt: skip
                proc = Process(server, pinned(0, argv), port, work / f"{server}.log")
                try:
                    proc.wait_ready()
                    wrk(port, body, 1, work)  # warm-up
                    before = proc.cpu_seconds()
                    _, calls = wrk(port, body, seconds, work)
                    costs.append((proc.cpu_seconds() - before) / calls * 1e6)
                    print(f"round {rnd + 1} {server:8s} {calls / seconds:8.0f} calls/s"
                          f"  {costs[-1]:6.1f} us CPU/call", flush=True)  # fmt: skip
                finally:
                    proc.stop()
    finally:
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    # Rounds drift together on a shared machine: the difference is taken round by round.
    diffs = sorted(x - y for x, y in zip(cost["aiohttp"], cost["bare"], strict=True))
    mid = rounds // 2
    print(f"\nCPU per JSON call, median of {rounds} rounds: aiohttp's server"
          f" {sorted(cost['aiohttp'])[mid]:.1f} us, a bare httptools server"
          f" {sorted(cost['bare'])[mid]:.1f} us; aiohttp's server costs {diffs[mid]:.1f} us"
          f" a call more (round by round {diffs[0]:.1f}-{diffs[-1]:.1f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--serve", choices=("aiohttp", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "aiohttp":
        serve_aiohttp(args.port, args.upstream)
    elif args.serve == "bare":
        serve_bare(args.port, args.upstream)
    else:
        measure(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
