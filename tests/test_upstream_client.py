"""The upstream client against real loopback servers that write exact bytes: framing,
keep-alive and the pool, timeouts, cuts, flow control, TLS, and what it refuses to send."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trustme
from aiohttp import web

from proxy.http1 import ReadTimeout, UpstreamError
from proxy.upstream_client import CannotConnect, ConnectTimeout, Timeout, UpstreamClient, split_url

T = Timeout(2.0, 2.0)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A loopback server running `script` on each connection; counts connections and
    keeps the raw requests it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def read_request(self, r: asyncio.StreamReader) -> bytes:
        head = await r.readuntil(b"\r\n\r\n")
        body = b""
        lower = head.lower()
        if b"content-length:" in lower:
            length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            body = await r.readexactly(length)
        elif b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await r.readuntil(b"\r\n")).strip(), 16)
                chunk = await r.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        self.requests.append(head + body)
        return head + body


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n" + "".join(
        f"{h}\r\n" for h in extra
    )
    return head.encode() + b"\r\n" + body


def served(up: Upstream, *answers: bytes) -> Script:
    """Each request read gets the next answer, on whichever connection it came."""
    queue = list(answers)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while queue:
            await up.read_request(r)
            w.write(queue.pop(0))
            await w.drain()

    return script


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    await c.close()


async def call(client: UpstreamClient, url: str, **kw: Any) -> tuple[int, bytes]:
    r = await client.request(kw.pop("method", "POST"), url + kw.pop("path", "/v1/x"),
                             kw.pop("headers", {}), kw.pop("body", b"{}"), kw.pop("t", T))  # fmt: skip
    try:
        return r.status, await r.read()
    finally:
        r.release()


# -- framing and keep-alive ---------------------------------------------------------------


async def test_answers_of_each_framing_come_whole_and_the_connection_is_reused(
    client: UpstreamClient,
) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nHello\r\n6\r\n world\r\n0\r\n\r\n"
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" + answer(
        b"after 103"
    )
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, answer(b'{"a":1}'), chunked, early_hints,
                       answer(b"", status="204 No Content"), answer(b"last"))  # fmt: skip
    async with up:
        assert await call(client, up.url) == (200, b'{"a":1}')
        assert await call(client, up.url) == (200, b"Hello world")
        assert await call(client, up.url) == (200, b"after 103")
        assert await call(client, up.url) == (204, b"")
        assert await call(client, up.url) == (200, b"last")
    assert up.connections == 1
    first = up.requests[0]
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
    assert first.endswith(b"\r\nContent-Length: 2\r\n\r\n{}")


async def test_a_body_that_ends_with_the_connection_and_connection_close(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(r)
        if up.connections != 2:  # no length, not chunked: the body is all until the close
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        else:
            w.write(answer(b"closing", "Connection: close"))
        await w.drain()

    up.script = script
    async with up:
        assert await call(client, up.url) == (200, b"until the end")
        assert await call(client, up.url) == (200, b"closing")
        assert await call(client, up.url) == (200, b"until the end")  # a new connection
    assert up.connections == 3


async def test_head_ends_with_its_head(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    async with up:
        r = await client.request("HEAD", up.url + "/v1/models", {}, None, T)
        assert (r.status, r.content_length, await r.read()) == (200, 1234, b"")
        host = up.url.removeprefix("http://").encode()
    assert up.requests[0] == b"HEAD /v1/models HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    assert client.open_connections == 0  # a body may follow a HEAD's head: not reused


async def test_headers_go_and_come_as_they_are(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, answer(b"ok", "X-Twice: 1", "x-twice: 2", "X-Utf8: caf\u00e9"))
    async with up:
        r = await client.request(
            "POST", up.url + "/v1/a b/\u00e9?q=1&raw=%20", {"X-A": "1", "x-b": "two words"}, b"", T
        )
        await r.read()
    assert r.headers.getall("X-Twice") == ["1", "2"]
    assert r.headers["X-Utf8"] == "caf\u00e9"
    head = up.requests[0].decode()
    # What a request line cannot carry raw is percent-encoded; what was encoded stays so.
    assert head.startswith("POST /v1/a%20b/%C3%A9?q=1&raw=%20 HTTP/1.1\r\n")
    assert "\r\nX-A: 1\r\nx-b: two words\r\nContent-Length: 0\r\n\r\n" in head


@pytest.mark.parametrize("name, value", [("X-Evil", "a\r\nX-Injected: 1"), ("X-Evil", "a\nb"),
                                         ("X-Evil", "a\rb"), ("X-E\r\nvil", "a")])  # fmt: skip
async def test_a_header_with_a_line_break_is_not_sent(
    client: UpstreamClient, name: str, value: str
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, answer(b"ok"))
    async with up:
        with pytest.raises(UpstreamError, match=re.escape(f"header {name!r} holds a line break")):
            await client.request("POST", up.url + "/v1/x", {"X-Fine": "1", name: value}, b"", T)
        assert await call(client, up.url) == (200, b"ok")
    assert len(up.requests) == 1 and b"X-Evil" not in up.requests[0]


async def test_a_streamed_body_goes_chunked(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, answer(b"got it"))

    async def upload() -> AsyncIterator[bytes]:
        for piece in (b"part one, ", b"", b"part two"):
            yield piece
            await asyncio.sleep(0.01)

    async with up:
        assert await call(client, up.url, body=upload()) == (200, b"got it")
    assert b"\r\nTransfer-Encoding: chunked\r\n\r\n" in up.requests[0]
    assert up.requests[0].endswith(b"\r\n\r\npart one, part two")


async def test_an_answer_before_the_upload_ends_is_taken_and_its_connection_dropped(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(answer(b"too large", status="413 Payload Too Large"))
        await w.drain()
        await asyncio.sleep(1)

    up.script = script
    stop = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while not stop.is_set():
            yield b"x" * 1024
            await asyncio.sleep(0.005)

    async with up:
        assert await call(client, up.url, body=endless()) == (413, b"too large")
        stop.set()
        assert client.open_connections == 0


# -- failures ---------------------------------------------------------------------------


async def test_connection_refused(client: UpstreamClient) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(CannotConnect, match=f"cannot connect to 127.0.0.1:{port}"):
        await call(client, f"http://127.0.0.1:{port}")


async def test_a_name_that_does_not_resolve(client: UpstreamClient) -> None:
    with pytest.raises(CannotConnect, match=r"cannot resolve nothing-here\.invalid"):
        await call(client, "http://nothing-here.invalid:80")


async def test_connect_timeout() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):  # a full backlog that is never accepted: new connects hang
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    client = UpstreamClient()
    try:
        started = time.monotonic()
        with pytest.raises(ConnectTimeout, match=r"within 0\.3s"):
            await call(client, f"http://127.0.0.1:{port}", t=Timeout(0.3, 5))
        assert 0.25 < time.monotonic() - started < 2
    finally:
        await client.close()
        for c in fillers:
            c.close()
        server.close()


async def test_silence_before_the_head_and_mid_body_times_out_a_trickle_does_not(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await up.read_request(r)
        if b"/silent" in request:
            await asyncio.sleep(2)
        elif b"/stalls" in request:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
            await w.drain()
            await asyncio.sleep(2)
        else:  # 12 pieces 0.1 s apart: 1.2 s in all, never 0.3 s silent
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
            for _ in range(12):
                await asyncio.sleep(0.1)
                w.write(b"x")
                await w.drain()

    up.script = script
    t = Timeout(2, 0.3)
    async with up:
        started = time.monotonic()
        with pytest.raises(ReadTimeout, match=r"silent for more than 0\.3s"):
            await call(client, up.url, path="/silent", t=t)
        assert 0.25 < time.monotonic() - started < 1.0
        r = await client.request("POST", up.url + "/stalls", {}, b"", t)
        assert await r.readany() == b"first"
        with pytest.raises(ReadTimeout):
            await r.readany()
        assert await call(client, up.url, path="/trickle", t=t) == (200, b"x" * 12)


async def test_a_cut_before_the_answer_and_mid_body(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await up.read_request(r)
        if b"/mid-body" in request:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            await w.drain()
        elif b"/garbage" in request:
            w.write(b"this is not HTTP\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.5)

    up.script = script
    async with up:
        with pytest.raises(UpstreamError, match="closed the connection before answering"):
            await call(client, up.url, path="/before")
        r = await client.request("POST", up.url + "/mid-body", {}, b"", T)
        assert await r.readany() == b"only this"
        with pytest.raises(UpstreamError, match="closed the connection mid-body"):
            await r.readany()
        with pytest.raises(UpstreamError, match=r"not valid HTTP/1\.1"):
            await call(client, up.url, path="/garbage")
    assert client.open_connections == 0


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(r)
        w.write(answer(b"once"))
        await w.drain()  # then the server closes it: its keep-alive ran out

    up.script = script
    async with up:
        assert await call(client, up.url) == (200, b"once")
        await asyncio.sleep(0.1)
        assert await call(client, up.url) == (200, b"once")
    assert up.connections == 2


async def test_an_upstream_that_talks_out_of_turn_loses_its_connection(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(r)
        w.write(answer(b"one"))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nsent")  # nobody asked
        await w.drain()
        await asyncio.sleep(1)

    up.script = script
    async with up:
        assert await call(client, up.url) == (200, b"one")
        await asyncio.sleep(0.2)
        assert client.open_connections == 0
        assert await call(client, up.url) == (200, b"one")


async def test_an_answer_left_unread_takes_its_connection_and_idle_ones_expire() -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            request = await up.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            if b"/whole" in request:
                w.write(b"-whole")
            await w.drain()

    up.script = script
    client = UpstreamClient(keepalive=0.2)
    try:
        async with up:
            r = await client.request("POST", up.url + "/half", {}, b"", T)
            assert await r.readany() == b"half"
            r.release()
            assert client.open_connections == 0
            assert await call(client, up.url, path="/whole") == (200, b"half-whole")
            assert client.open_connections == 1
            await asyncio.sleep(0.5)
            assert client.open_connections == 0  # idle past keepalive: closed
    finally:
        await client.close()


async def test_a_reader_that_falls_behind_pauses_the_upstream(client: UpstreamClient) -> None:
    size = 20 * 1024 * 1024
    block = bytes(range(256)) * 256
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(r)
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(block)):
            w.write(block)
            await w.drain()

    up.script = script
    async with up:
        r = await client.request("POST", up.url, {}, b"", Timeout(2, 0.5))
        await asyncio.sleep(1.0)  # not reading, longer than the read timeout: no timeout
        buffered = len(r.read_nowait())
        assert 0 < buffered < 1024 * 1024, buffered
        received = buffered
        while chunk := await r.readany():
            received += len(chunk)
        assert received == size


async def test_tls(tmp_path: Any, unused_tcp_port: int) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"over TLS: {await request.text()}")

    app = web.Application()
    app.router.add_post("/v1/x", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port, ssl_context=server_ctx)
    await site.start()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    clients = [UpstreamClient(tls=trusting), UpstreamClient()]
    try:
        url = f"https://localhost:{unused_tcp_port}"
        assert await call(clients[0], url, body=b"hi") == (200, b"over TLS: hi")
        assert await call(clients[0], url, body=b"again") == (200, b"over TLS: again")
        assert clients[0].open_connections == 1
        with pytest.raises(CannotConnect, match="CERTIFICATE_VERIFY_FAILED"):
            await call(clients[1], url)  # the system's CAs do not know this one
    finally:
        for c in clients:
            await c.close()
        await runner.cleanup()


def test_urls_split_into_where_and_what() -> None:
    origin, target = split_url("https://api.openai.com/v1/chat/completions?x=1")
    assert origin == ("api.openai.com", 443, True, "api.openai.com", False)
    assert target == "/v1/chat/completions?x=1"
    origin, target = split_url("http://[::1]:8080")
    assert (origin, target) == (("::1", 8080, False, "[::1]:8080", True), "/")
    assert split_url("http://user:pw@10.0.0.1/v1")[0].host_header == "10.0.0.1"
    with pytest.raises(UpstreamError, match="not an http"):
        split_url("ftp://example.com/v1")


async def test_pump_hands_pieces_to_a_sink_until_it_stops(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            request = await up.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
            for _ in range(4 if b"/whole" in request else 2):
                w.write(b"x" * 100)
                await w.drain()
                await asyncio.sleep(0.02)
            if b"/cut" in request:
                return

    up.script = script
    async with up:
        r = await client.request("POST", up.url + "/whole", {}, b"", T)
        seen: list[int] = []

        def first_two(piece: bytes) -> bool:
            seen.append(len(piece))
            return sum(seen) < 200

        await r.pump(first_two)  # returns once the sink says stop, the rest left unread
        assert sum(seen) == 200
        rest = await r.read()
        assert len(rest) == 200 and r.at_eof()
        await r.pump(first_two)  # the body has ended: nothing more, no wait

        def broken(piece: bytes) -> bool:
            raise ValueError("a bug in the sink")

        r = await client.request("POST", up.url + "/whole", {}, b"", T)
        with pytest.raises(ValueError, match="a bug in the sink"):
            await r.pump(broken)
        r.release()

        r = await client.request("POST", up.url + "/cut", {}, b"", T)
        got: list[bytes] = []
        with pytest.raises(UpstreamError, match="closed the connection mid-body"):
            await r.pump(lambda piece: got.append(piece) is None)
        assert sum(map(len, got)) == 200  # what came before the cut was handed on


async def test_what_one_read_brings_reaches_the_sink_in_one_piece(client: UpstreamClient) -> None:
    """Five HTTP chunks in one TCP write are five parser callbacks: the sink gets them as
    one piece (one write to the client, not five), and later reads as they come."""
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await up.read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.05)  # the sink is in place before the events come
        events = [b"data: %d\n\n" % i for i in range(5)]
        w.write(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events))
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"9\r\ndata: 5\n\n\r\n0\r\n\r\n")
        await w.drain()

    up.script = script
    async with up:
        r = await client.request("POST", up.url, {}, b"", T)
        pieces: list[bytes] = []
        await r.pump(lambda piece: pieces.append(piece) is None)
    assert pieces == [b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n", b"data: 5\n\n"]


async def test_a_short_read_timeout_holds_on_a_connection_last_used_with_a_long_one(
    client: UpstreamClient,
) -> None:
    """The silence timer stays armed between requests on a connection: a request with a
    shorter timeout than the last one's moves it earlier."""
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            request = await up.read_request(r)
            if b"/silent" in request:
                await asyncio.sleep(3)
            w.write(answer(b"ok"))
            await w.drain()

    up.script = script
    async with up:
        assert await call(client, up.url, t=Timeout(2, 30)) == (200, b"ok")
        started = time.monotonic()
        with pytest.raises(ReadTimeout, match=r"silent for more than 0\.3s"):
            await call(client, up.url, path="/silent", t=Timeout(2, 0.3))
        assert 0.25 < time.monotonic() - started < 1.0
    assert up.connections == 1  # the same connection, whose timer was armed for 30 s


async def test_a_second_answer_in_the_same_read_does_not_overwrite_the_first(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await up.read_request(r)
            w.write(answer(b"one") + answer(b"nobody asked", status="500 Oops"))
            await w.drain()

    up.script = script
    async with up:
        assert await call(client, up.url) == (200, b"one")
        assert client.open_connections == 0  # it talked out of turn: dropped
        assert await call(client, up.url) == (200, b"one")
    assert up.connections == 2


async def test_trailers_after_a_chunked_answer_stay_with_it(client: UpstreamClient) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(
        up,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
        answer(b"second", "X-Second: 2"),
    )
    async with up:
        assert await call(client, up.url) == (200, b"ok")
        r = await client.request("POST", up.url + "/v1/x", {}, b"", T)
        assert await r.read() == b"second"
        r.release()
    assert "X-Trailer" not in r.headers and r.headers["X-Second"] == "2"
    assert up.connections == 1


async def test_an_upstream_that_switches_protocols_fails_the_call_cleanly(
    client: UpstreamClient,
) -> None:
    up = Upstream(lambda r, w: asyncio.sleep(0))
    up.script = served(up, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                           b"Connection: Upgrade\r\n\r\n")  # fmt: skip
    async with up:
        with pytest.raises(UpstreamError, match="switched protocols"):
            await call(client, up.url)
    assert client.open_connections == 0
