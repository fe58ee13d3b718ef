"""Concurrent long streams: N streams open at once, each a chunk every 20-50 ms.

`python -m bench.streams --streams 1000 --seconds 30` runs the floor and meterproxy (in
turn, same fake upstream) and reports per target: failed streams, RSS per open stream
over the idle process, CPU per chunk, and the time a chunk spends inside the proxy (the
fake upstream writes its send time into each chunk; the client subtracts it on arrival:
the floor's figure is what any proxy on this stack adds). Every loop is bounded by
--seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from bench.__main__ import Process, free_port, pinned


def upstream_app(seconds: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            await asyncio.sleep(random.uniform(0.02, 0.05))
            n += 1
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": f"{time.time_ns()} "}}],
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
        }
        await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def one_stream(session: ClientSession, url: str, delays: list[float]) -> bool:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    try:
        async with session.post(url, json=body, headers={"X-Agent-Id": "streamer"}) as r:
            if r.status != 200:
                return False
            done = False
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif b'"content": "' in line:
                    sent = int(line.split(b'"content": "', 1)[1].split(b" ", 1)[0])
                    delays.append((time.time_ns() - sent) / 1e6)
            return done
    except Exception:
        return False


async def client(url: str, n: int, seconds: float, out: Path) -> None:
    delays: list[float] = []
    timeout = ClientTimeout(total=seconds + 60)
    async with ClientSession(connector=TCPConnector(limit=0), timeout=timeout) as s:
        tasks = [asyncio.create_task(one_stream(s, url, delays)) for _ in range(n)]
        results = await asyncio.gather(*tasks)
    out.write_text(  # noqa: ASYNC240 - once, after every stream ended
        json.dumps({"ok": sum(results), "failed": n - sum(results), "delays": delays})
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_target(
    name: str, proc: Process, port: int, path: str, args: argparse.Namespace, work: Path
) -> dict[str, float]:
    pid = proc.proc.pid
    idle = rss_mb(pid)
    cpu0 = proc.cpu_seconds()
    out = work / f"{name}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.streams",
        "--client",
        f"http://127.0.0.1:{port}{path}",
        "--streams",
        str(args.streams),
        "--seconds",
        str(args.seconds),
        "--out",
        str(out),
    ]
    c = subprocess.Popen(pinned(1, argv))
    peak = idle
    while c.poll() is None:
        time.sleep(0.5)
        peak = max(peak, rss_mb(pid))
    cpu = proc.cpu_seconds() - cpu0
    data = json.loads(out.read_text())
    d = sorted(data["delays"])
    q = statistics.quantiles(d, n=100) if len(d) > 100 else [0.0] * 99
    return {
        "ok": data["ok"],
        "failed": data["failed"],
        "chunks": len(d),
        "p50": q[49],
        "p99": q[98],
        "rss_per_stream_kb": (peak - idle) * 1024 / args.streams,
        "cpu_us_per_chunk": cpu / max(len(d), 1) * 1e6,
        "idle_mb": idle,
        "peak_mb": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--client")
    p.add_argument("--out")
    p.add_argument("--upstream-port", type=int)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 3 sockets per stream
    if args.client:
        asyncio.run(client(args.client, args.streams, args.seconds, Path(args.out)))
        return
    if args.upstream_port:
        web.run_app(
            upstream_app(args.seconds),
            host="127.0.0.1",
            port=args.upstream_port,
            print=None,
            access_log=None,
        )
        return
    work = Path(tempfile.mkdtemp(prefix="meterproxy-streams-"))
    ports = {k: free_port() for k in ("upstream", "floor", "meterproxy")}
    up = f"http://127.0.0.1:{ports['upstream']}"
    config = {
        "server": {"host": "127.0.0.1", "port": ports["meterproxy"]},
        "upstreams": [{"name": "fake", "base_url": up + "/v1", "default": True}],
        "storage": {"url": f"sqlite:///{work / 'ledger.db'}"},
        "logging": {"file": str(work / "meterproxy.log"), "level": "INFO"},
        "budgets": {"agents": {"streamer": {"max_cost_per_day_usd": 1_000_000}}},
    }
    (work / "meterproxy.yaml").write_text(json.dumps(config))
    py = sys.executable
    procs = {
        "upstream": Process(
            "fake upstream",
            pinned(
                1,
                [
                    py,
                    "-m",
                    "bench.streams",
                    "--upstream-port",
                    str(ports["upstream"]),
                    "--seconds",
                    str(args.seconds),
                ],
            ),
            ports["upstream"],
            work / "up.log",
        ),
        "floor": Process(
            "floor",
            pinned(
                0, [py, "-m", "bench.forwarder", "--port", str(ports["floor"]), "--upstream", up]
            ),
            ports["floor"],
            work / "floor.log",
        ),
        "meterproxy": Process(
            "meterproxy",
            pinned(0, [py, "-m", "proxy", "serve", "--config", str(work / "meterproxy.yaml")]),
            ports["meterproxy"],
            work / "mp.log",
        ),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        print(
            f"{args.streams} streams, a chunk every 20-50 ms for {args.seconds:g} s;"
            " proxies on core 0, client and upstream on core 1"
        )
        print(
            f"{'target':<11}{'ok':>7}{'failed':>8}{'chunks':>9}{'delay p50':>11}"
            f"{'p99 ms':>8}{'KB/stream':>11}{'CPU us/chunk':>14}{'RSS MB idle/peak':>19}"
        )
        for name, path in (
            ("floor", "/v1/chat/completions"),
            ("meterproxy", "/v1/chat/completions"),
        ):
            r = run_target(name, procs[name], procs[name].port, path, args, work)
            print(
                f"{name:<11}{r['ok']:>7.0f}{r['failed']:>8.0f}{r['chunks']:>9.0f}"
                f"{r['p50']:>11.2f}{r['p99']:>8.2f}{r['rss_per_stream_kb']:>11.1f}"
                f"{r['cpu_us_per_chunk']:>14.1f}{r['idle_mb']:>10.0f}/{r['peak_mb']:.0f}",
                flush=True,
            )
    finally:
        for proc in procs.values():
            proc.stop()


if __name__ == "__main__":
    main()
