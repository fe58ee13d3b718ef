"""Two measurements beside the throughput table: memory while one 50 MB response streams
through, and a call with a 400 KB prompt next to a steady flow of small calls."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from bench.loadgen import Connection, build_request, open_loop

AGENT = {"X-Agent-Id": "bench-agent"}


def big_stream(proc: Any, port: int) -> None:
    """RSS of the proxy, sampled every 20 ms, while a 50 MB SSE response passes."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(proc.rss_mb())
            time.sleep(0.02)

    body = json.dumps(
        {
            "model": "gpt-4o",
            "stream": True,
            "messages": [{"role": "user", "content": "bench_big_stream"}],
        }
    ).encode()

    async def run() -> tuple[int, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = Connection(reader, writer)
        t0 = time.perf_counter()
        writer.write(build_request(port, "/v1/chat/completions", body, AGENT))
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head[:16], head
        received = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            received += size
            if size == 0:
                break
        writer.close()
        del conn
        return received, time.perf_counter() - t0

    before = proc.rss_mb()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    received, seconds = asyncio.run(run())
    stop.set()
    thread.join()
    peak = max(samples) if samples else float("nan")
    print(
        f"50 MB stream: {received / 2**20:.1f} MB relayed in {seconds:.2f} s;"
        f" proxy RSS {before:.0f} MB before, {peak:.0f} MB at most during it"
        f" (+{peak - before:.1f} MB): nothing buffers the stream"
    )


def big_prompt(port: int) -> None:
    """One 400 KB prompt while 100 small calls a second go on: the small calls' latency
    during it shows whether counting its tokens blocks the event loop."""
    small = build_request(
        port,
        "/v1/chat/completions",
        json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        ).encode(),
        AGENT,
    )
    words = " ".join(f"word{i % 5000}" for i in range(60_000))[:400_000]
    big = build_request(
        port,
        "/v1/chat/completions",
        json.dumps(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": words}], "max_tokens": 16}
        ).encode(),
        {**AGENT, "X-Intent-Id": "big"},
    )

    async def run() -> tuple[float, Any, Any]:
        baseline = await open_loop(port, small, 100, 3)
        flow = asyncio.ensure_future(open_loop(port, small, 100, 4))
        await asyncio.sleep(1.5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, _ = await Connection(reader, writer).request(big)
        t0 = time.perf_counter()
        status, _ = await Connection(reader, writer).request(big)  # the second one: timed
        big_seconds = time.perf_counter() - t0
        assert status == 200
        writer.close()
        return big_seconds, baseline, await flow

    big_seconds, baseline, during = asyncio.run(run())
    print(
        f"400 KB prompt: the call took {big_seconds * 1000:.1f} ms. Small calls at 100/s:"
        f" p50 {baseline.pct(baseline.latencies, 50) * 1000:.2f} /"
        f" p99 {baseline.pct(baseline.latencies, 99) * 1000:.2f} /"
        f" max {max(baseline.latencies) * 1000:.2f} ms without it,"
        f" p50 {during.pct(during.latencies, 50) * 1000:.2f} /"
        f" p99 {during.pct(during.latencies, 99) * 1000:.2f} /"
        f" max {max(during.latencies) * 1000:.2f} ms around it"
    )
