"""The load side of `bench.streams` on raw asyncio protocols: a long-stream upstream and
a client that reads timestamps out of the chunks.

Both share core 1 while the proxy under test has core 0; at 1,000 streams that is about
28,000 chunks a second each way, which aiohttp's client and server cannot do on one core
(their own delay would be measured as the proxy's). A protocol callback per chunk, a
`call_later` timer per stream instead of a task, and uvloop when installed keep the load
side at a few microseconds a chunk. On asyncio's own loop the two filled core 1 (99-100%
busy) and chunks queued there for 10-40 ms, counted as the proxy's delay: `bench.streams`
now reports how busy the load side was, so a figure it distorted is seen as such.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

T = TypeVar("T")

# A chunk as OpenAI sends it (one token of text), plus the upstream's send time in a
# field of its own: what a proxy does with a real token's text is part of the measure.
CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-s","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","x_sent_ns":'
)
CHUNK_MID = b',"choices":[{"index":0,"delta":{"content":"'
CHUNK_TAIL = b'"},"finish_reason":null}]}\n\n'
_VOCABULARY = (
    "the of and to a in is that it was for on are with as I be at by this had not but from"
    " or have an they which one you were all her she there would their we him been has"
    " when who will no more if out so said what up its about into"
)
WORDS = [b" " + w.encode() for w in _VOCABULARY.split()]
STAMP = b'"x_sent_ns":'
SECONDS = b'"bench_seconds": '
INTERVAL = b'"bench_chunk_ms": ['


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed (the proxies under test use it too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class LongStreamUpstream(asyncio.Protocol):
    """Answers every POST with an SSE stream: a chunk every 20-50 ms (or the body's
    "bench_chunk_ms") for the body's "bench_seconds", each carrying its send time (ns);
    then usage and [DONE]. Keep-alive, like a provider."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.sent = 0
        self.end = 0.0
        self.interval = (0.02, 0.05)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = 0
        for line in self.buf[:head_end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < head_end + 4 + length:
            return
        body = self.buf[head_end + 4 : head_end + 4 + length]
        self.buf = self.buf[head_end + 4 + length :]
        at = body.find(SECONDS)
        seconds = float(body[at + len(SECONDS) :].split(b",")[0]) if at >= 0 else 1.0
        at = body.find(INTERVAL)
        if at >= 0:
            lo, hi = body[at + len(INTERVAL) :].split(b"]")[0].split(b",")
            self.interval = (float(lo) / 1000, float(hi) / 1000)
        self.start(seconds)

    def start(self, seconds: float) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.sent = 0
        self.end = self.loop.time() + seconds
        self.loop.call_later(random.uniform(*self.interval), self.tick)

    def tick(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.loop.time() >= self.end:
            usage = {
                "id": "chatcmpl-s",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": self.sent,
                    "total_tokens": 5 + self.sent,
                },
            }
            t.write(
                _chunked(b"data: " + json.dumps(usage).encode() + b"\n\n")
                + _chunked(b"data: [DONE]\n\n")
                + b"0\r\n\r\n"
            )
            return
        self.sent += 1
        word = WORDS[self.sent % len(WORDS)]
        t.write(_chunked(CHUNK_HEAD + b"%d" % time.time_ns() + CHUNK_MID + word + CHUNK_TAIL))
        self.loop.call_later(random.uniform(*self.interval), self.tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LongStreamUpstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


@dataclass
class Tally:
    delays_ms: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class StreamClient(asyncio.Protocol):
    """One streaming call: sends the request, decodes the chunked body, records each
    chunk's delay (arrival minus the upstream's stamp) and whether [DONE] came."""

    def __init__(self, request: bytes, tally: Tally, finished: asyncio.Future[None]) -> None:
        self.request = request
        self.tally = tally
        self.finished = finished
        self.buf = b""
        self.events = b""
        self.head_done = False
        self.chunked = True
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.buf += data
        if not self.head_done:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].lower()
            if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
                self.end(f"status {head[9:12].decode()}")
                return
            self.chunked = b"transfer-encoding: chunked" in head
            self.buf = self.buf[head_end + 4 :]
            self.head_done = True
        if self.chunked:
            while True:
                line_end = self.buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self.buf[:line_end].split(b";")[0], 16)
                if size == 0:
                    self.events_received(now)
                    self.end(None if self.done else "no [DONE]")
                    return
                if len(self.buf) < line_end + 2 + size + 2:
                    break
                self.events += self.buf[line_end + 2 : line_end + 2 + size]
                self.buf = self.buf[line_end + 2 + size + 2 :]
        else:
            self.events += self.buf
            self.buf = b""
        self.events_received(now)

    def events_received(self, now: int) -> None:
        cut = self.events.rfind(b"\n\n")
        if cut < 0:
            return
        complete, self.events = self.events[: cut + 2], self.events[cut + 2 :]
        at = complete.find(STAMP)
        while at >= 0:
            start = at + len(STAMP)
            stop = complete.find(b",", start)
            self.tally.delays_ms.append((now - int(complete[start:stop])) / 1e6)
            at = complete.find(STAMP, stop)
        if b"data: [DONE]" in complete:
            self.done = True

    def end(self, failure: str | None) -> None:
        if self.finished.done():
            return
        if failure is None:
            self.tally.ok += 1
        else:
            self.tally.fail(failure)
        self.finished.set_result(None)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chunked and self.head_done:
            self.events_received(time.time_ns())
            self.end(None if self.done else "no [DONE]")
        else:
            self.end(f"connection lost: {type(exc).__name__ if exc else 'closed'}")


def stream_request(port: int, path: str, seconds: float, chunk_ms: tuple[int, int]) -> bytes:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "bench_seconds": seconds,
            "bench_chunk_ms": list(chunk_ms),
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Write a long story."}],
        }
    ).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nX-Agent-Id: streamer\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def run_clients(
    port: int,
    path: str,
    n: int,
    seconds: float,
    ramp: float,
    limit: float,
    chunk_ms: tuple[int, int] = (20, 50),
) -> Tally:
    """Opens n streams spread evenly over `ramp` seconds (thousands of agents do not
    connect in the same millisecond) and waits, at most `limit` seconds, for all."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    request = stream_request(port, path, seconds, chunk_ms)
    futures: list[asyncio.Future[None]] = []

    async def open_one(finished: asyncio.Future[None]) -> None:
        try:
            await loop.create_connection(
                lambda: StreamClient(request, tally, finished), "127.0.0.1", port
            )
        except OSError as e:
            tally.fail(f"connect: {e.strerror or type(e).__name__}")
            finished.set_result(None)

    start = loop.time()
    opening = []
    for i in range(n):
        delay = start + ramp * i / n - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        fut = loop.create_future()
        futures.append(fut)
        opening.append(asyncio.create_task(open_one(fut)))
    await asyncio.gather(*opening)
    _done, pending = await asyncio.wait(futures, timeout=limit)
    for _ in pending:
        tally.fail("unfinished at the time limit")
    return tally
