"""One HTTP/1.1 connection to an upstream: a request written, its answer parsed by
httptools (llhttp, the parser of Node.js and of aiohttp itself) and handed to a
`Response` as it arrives, with flow control both ways. The pool that owns connections
is `proxy.upstream_client`.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterable, Callable, Hashable, Mapping
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_HIGH_WATER = 256 * 1024  # buffered answer bytes at which the upstream is paused
_LINE_BREAK = re.compile(r"[\r\n]")


class UpstreamError(Exception):
    """The exchange with the upstream failed (other than by a timeout)."""


class ReadTimeout(TimeoutError):
    """The upstream was silent for longer than the read timeout."""


class Pool(Protocol):
    """Where a connection goes back once its answer is complete, or is forgotten."""

    def park(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Response:
    """An upstream's answer to a request that went out: its head (`head()`), then its
    body as it arrives. What arrives is taken in by the connection's callbacks whatever
    happens to the task that waits for it: a caller cancelled while it waits can leave
    the answer to another to finish."""

    __slots__ = (
        "_buffer", "_conn", "_eof", "_error", "_headed", "_sink", "_size", "_waiter",
        "headers", "status",
    )  # fmt: skip

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self._headed = False
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self._buffer: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Callable[[bytes], bool] | None = None  # see pump()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def head(self) -> None:
        """Until the status and headers are in; raises what failed before them."""
        while not self._headed:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        """Until the connection hands over something: the head, bytes, the end, an error."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- the body, as it comes -------------------------------------------------------

    def at_eof(self) -> bool:
        """The whole body arrived and was read."""
        return self._eof and not self._buffer

    def read_nowait(self) -> bytes:
        """What has arrived and was not read yet (b"" when nothing has)."""
        self._raise_if_cut()
        if not self._buffer:
            return b""
        data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume()
        return data

    async def readany(self) -> bytes:
        """The next bytes of the body as soon as there are any; b"" at its end."""
        while not self._buffer and not self._eof:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.read_nowait()

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        data = await self.readany()
        if not data:
            raise StopAsyncIteration
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, it stops once more than `limit` bytes came."""
        parts = []
        size = 0
        while limit is None or size <= limit:
            data = await self.readany()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pump(self, sink: Callable[[bytes], bool]) -> None:
        """Hand the body to `sink` piece by piece as it arrives, inside the connection's
        callback: no task wakes up per piece. What arrived before goes first. Returns
        once `sink` returns False (it took that piece, and wants no more for now) or the
        body has ended; raises what cut the body, or what `sink` raised."""
        while self._buffer:
            if not sink(self.read_nowait()):
                return
        if self._eof:
            return
        self._raise_if_cut()
        self._sink = sink
        try:
            await self._wait()
        finally:
            self._sink = None
        self._raise_if_cut()

    def _raise_if_cut(self) -> None:
        """What cut the body, once what came before it has been read."""
        if self._error is not None and not self._buffer:
            raise self._error

    # -- the connection behind it -----------------------------------------------------

    def release(self) -> None:
        """Done with it: an answer not read to its end takes its connection with it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    close = release

    # -- fed by the connection -------------------------------------------------------

    def _feed(self, pieces: list[bytes]) -> None:
        self._buffer.extend(pieces)
        self._size += sum(map(len, pieces))

    def _arrived(self) -> None:
        """The end of one read (the parser may have cut it into many pieces): the sink
        gets it in one piece, or whoever waits is woken once."""
        sink = self._sink
        if sink is not None:
            try:
                if sink(self.read_nowait()):
                    return
            except Exception as e:  # raised by pump(), not into the connection's parser
                self._error = e
            self._sink = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, error: BaseException | None) -> None:
        self._conn = None
        if error is None:
            self._eof = True
        else:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer fed to a Response."""

    def __init__(self, pool: Pool, origin: Hashable) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # The body's pieces, one per HTTP chunk: the parser calls a list's append (a C
        # call, no Python frame per piece) and data_received hands them on, once a read.
        self._pieces: list[bytes] = []
        self.on_body: Callable[[bytes], None] = self._pieces.append
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self.response: Response | None = None
        self.head_only = False  # HEAD: the answer ends with its head
        self.sending: asyncio.Task[None] | None = None  # a body still being sent
        self._headers: list[tuple[str, str]] = []
        self._informational = False
        self._until_close = False  # no length, not chunked: the body ends with the connection
        self._complete = False
        self._keep_alive = False  # read at the head: the parser forgets it once it is done
        self._read_timeout: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when it fires
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self.response is None:  # nothing asked: an upstream that talks out of turn
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # not an HttpParserError: never asked for either
            self._pieces.clear()
            self._fail(UpstreamError("the upstream switched protocols, which is not relayed"))
            self.abort()
            return
        except httptools.HttpParserError as e:
            if not self._complete:
                self._pieces.clear()
                self._fail(UpstreamError(f"the upstream's answer is not valid HTTP/1.1: {e}"))
                self.abort()
                return
            self._keep_alive = False  # bytes after the answer, in the same read: out of turn
        pieces = self._pieces
        response = self.response
        if pieces:
            if response is not None and not self.head_only:
                response._feed(pieces)
            pieces.clear()
        if response is not None and response._buffer:
            response._arrived()
            if response._size > _HIGH_WATER and not self.reading_paused:
                self.reading_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        if self._complete:
            self._done()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.response is not None:
            started = self.response._headed
            if exc is None and self._until_close and started:
                self._complete = True
                self._done()
            else:
                why = (
                    "the upstream closed the connection mid-body"
                    if started
                    else "the upstream closed the connection before answering"
                )
                self._fail(UpstreamError(why + (f": {exc}" if exc else "")))
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_exception(UpstreamError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes | None) -> None:
        self._headers.append(
            (name.decode("utf-8", "surrogateescape"),
             value.decode("utf-8", "surrogateescape") if value else "")
        )  # fmt: skip

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 103 Early Hints and the like: not it
            self._informational = True
            return
        response = self.response
        assert response is not None
        response.status = status
        headers = CIMultiDict(self._headers)
        response.headers = CIMultiDictProxy(headers)
        self._keep_alive = self.parser.should_keep_alive()
        self._until_close = (
            "Content-Length" not in headers
            and "Transfer-Encoding" not in headers
            and status not in (204, 304)
        )
        response._headed = True
        response._arrived()
        if self.head_only:
            self._complete = True
            self._until_close = False

    def on_message_begin(self) -> None:
        if self._complete:  # a second message in the read that completed the answer
            raise UpstreamError("the upstream sent more than its answer")
        # The one place the list starts over: a 1xx's headers, and a chunked answer's
        # trailers (on_header after its head), never become the next answer's headers.
        self._headers = []

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True

    # -- a request --------------------------------------------------------------------

    def start(self, head: bytes, body: bytes | AsyncIterable[bytes] | None, method: str,
              read_timeout: float | None) -> Response:  # fmt: skip
        """Write the request; its answer comes to the Response returned."""
        assert self.transport is not None
        response = Response(self)
        self.response = response
        self.head_only = method == "HEAD"
        self._complete = self._until_close = self._informational = False
        self._read_timeout = read_timeout
        self._last_read = self.loop.time()
        if read_timeout is not None:
            self._arm(self._last_read + read_timeout)
        if body is None or isinstance(body, bytes):
            self.transport.writelines((head, body) if body else (head,))
        else:
            self.transport.write(head)
            self.sending = self.loop.create_task(self._send_chunked(body))
        return response

    async def _send_chunked(self, body: AsyncIterable[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if chunk and not self.closed:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                    if self._write_paused:
                        await self._drain()
            if not self.closed:
                transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the client's upload broke off: so does this request
            self._fail(UpstreamError(f"the request body could not be read: {e}"))
            self.abort()
        finally:
            self.sending = None

    async def _drain(self) -> None:
        if self.closed:
            raise UpstreamError("the upstream closed the connection")
        self._drained = self.loop.create_future()
        await self._drained

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._last_read = self.loop.time()  # silence while paused was ours
            if self._read_timeout is not None and self.response is not None:
                self._arm(self._last_read + self._read_timeout)

    def _arm(self, deadline: float) -> None:
        """The silence timer, to fire by `deadline`. One timer per connection, moved on
        only when it fires: a read costs a clock read, and a request on a connection whose
        timer is armed costs nothing (aiohttp arms one per read; arming and cancelling a
        timer is 3.4 us)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return  # it fires first, and moves itself on
            timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._check_silence)

    def _check_silence(self) -> None:
        self._timer = None
        timeout = self._read_timeout
        if self.response is None or self.reading_paused or timeout is None:
            return  # nothing awaited (left armed after the last answer), or ours to wait
        deadline = self._last_read + timeout
        if self.loop.time() < deadline:
            self._arm(deadline)
            return
        self._fail(ReadTimeout(f"the upstream was silent for more than {timeout:g}s"))
        self.abort()

    def _done(self) -> None:
        """The answer is complete: the response has it all, the connection is free."""
        response, self.response = self.response, None
        self._complete = False  # the timer stays: the next request on this connection uses it
        reusable = (
            not self.closed
            and self.sending is None
            and not self._until_close
            and not self.head_only
            and self._keep_alive
        )
        if self.sending is not None:  # answered before the body was all sent
            self.sending.cancel()
        if response is not None:
            response._end(None)
        if reusable:
            if self.reading_paused:
                self.reading_paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            self.pool.park(self)
        else:
            self.abort()

    def _fail(self, error: BaseException) -> None:
        response, self.response = self.response, None
        if response is not None:
            response._end(error)

    def abort(self) -> None:
        """Drop the connection now (an answer not read to its end cannot be reused)."""
        if self.sending is not None:
            self.sending.cancel()
        if self.response is not None:
            self._fail(UpstreamError("the answer was abandoned"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        self.pool.forget(self)


def request_head(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str] | CIMultiDict[str],
    body: bytes | AsyncIterable[bytes] | None,
) -> bytes:
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if fields.count("\n") != len(headers) or fields.count("\r") != len(headers):
        # A line break inside a header would end it early: a header (or a request) of
        # the client's making smuggled into the upstream. Refused, naming the header.
        bad = next(n for n, v in headers.items() if _LINE_BREAK.search(n + v))
        raise UpstreamError(f"header {bad!r} holds a line break; the request was not sent")
    if isinstance(body, bytes):
        length = f"Content-Length: {len(body)}\r\n"
    elif body is None:
        length = "Content-Length: 0\r\n" if method in _BODY_METHODS else ""
    else:
        length = "Transfer-Encoding: chunked\r\n"
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{fields}{length}\r\n"
    return head.encode("utf-8", "surrogateescape")


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
