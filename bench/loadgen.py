"""A small HTTP/1.1 load generator on raw asyncio: open loop (fixed rate) and closed loop.

Open loop sends request i at t0 + i/rate whatever happened before (no coordinated
omission), on a pool of keep-alive connections, and records latency and time to first
byte of the body (for a stream: the first event). Closed loop keeps N requests in flight.
Every run is bounded in count and time, and only talks to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds
    ttfb: list[float] = field(default_factory=list)
    errors: int = 0
    duration: float = 0.0

    def pct(self, values: list[float], p: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration if self.duration else 0.0


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, raw: bytes) -> tuple[int, float]:
        """Send a request; read the whole response. (status, seconds to the first body byte)."""
        t0 = time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        first = 0.0
        if b"transfer-encoding: chunked" in lower:
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line.strip(), 16)
                if not first:
                    first = time.perf_counter() - t0
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            i = lower.find(b"content-length:")
            length = int(lower[i + 15 : lower.find(b"\r\n", i)]) if i >= 0 else 0
            await self.reader.readexactly(length)
            first = time.perf_counter() - t0
        return status, first


def build_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _connections(port: int, n: int) -> list[Connection]:
    out = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out.append(Connection(reader, writer))
    return out


async def open_loop(port: int, raw: bytes, rate: float, seconds: float, pool: int = 64) -> Result:
    """`rate` requests a second for `seconds`; latency counted from the scheduled send time."""
    conns = await _connections(port, pool)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    result = Result()
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05
    tasks = []

    async def one(scheduled: float) -> None:
        conn = await idle.get()
        try:
            status, first = await conn.request(raw)
            done = loop.time()
            if status != 200:
                result.errors += 1
            else:
                result.latencies.append(done - scheduled)
                result.ttfb.append(first)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            return
        idle.put_nowait(conn)

    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
    result.duration = loop.time() - start
    for c in conns:
        c.writer.close()
    return result


async def closed_loop(port: int, raw: bytes, concurrency: int, seconds: float) -> Result:
    conns = await _connections(port, concurrency)
    result = Result()
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    start = loop.time()

    async def worker(conn: Connection) -> None:
        while loop.time() < end:
            t0 = loop.time()
            try:
                status, first = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                return
            if status == 200:
                result.latencies.append(loop.time() - t0)
                result.ttfb.append(first)
            else:
                result.errors += 1

    await asyncio.gather(*(worker(c) for c in conns))
    result.duration = loop.time() - start
    for c in conns:
        c.writer.close()
    return result
