"""Concurrent long streams: N streams open at once, each a chunk every 20-50 ms.

`python -m bench.streams --streams 1000 --seconds 30` runs the floor and meterproxy (in
turn, same fake upstream) and reports per target: failed streams, RSS per open stream
over the warmed-up idle process, CPU per chunk, and the time a chunk spends between the
upstream and the client (the fake upstream writes its send time into each chunk; the
client subtracts it on arrival: the floor's figure is what any proxy on this stack adds).
The load side is raw asyncio protocols (`bench.stream_load`) on core 1; the proxies get
core 0. Every loop is bounded by --seconds. `--chunk-ms 200-500` slows every stream (5,000
streams at 20-50 ms are 140,000 chunks a second: more than one core can relay).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.__main__ import Process, free_ports, pinned
from bench.stream_load import run_clients, run_fast, serve_upstream


def client(port: int, path: str, args: argparse.Namespace, out: Path) -> None:
    tally = run_fast(
        run_clients(
            port,
            path,
            args.streams,
            args.seconds,
            args.ramp,
            4 * args.seconds + args.ramp + 60,  # an overloaded proxy is late, not failed
            chunk_ms(args.chunk_ms),
        )
    )
    d = sorted(tally.delays_ms)
    q = statistics.quantiles(d, n=100) if len(d) > 100 else [0.0] * 99
    out.write_text(
        json.dumps(
            {
                "ok": tally.ok,
                "failed": tally.failed,
                "reasons": tally.reasons,
                "chunks": len(d),
                "p50": q[49],
                "p99": q[98],
                "max": d[-1] if d else 0.0,
            }
        )
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_target(
    name: str, proc: Process, upstream: Process, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    warm = work / f"{name}-warm.json"
    subprocess.run(client_argv(proc.port, 50, 1, 1, warm), check=True)
    idle = proc.rss_mb()
    user0, sys0 = proc.cpu_times()
    load0 = sum(upstream.cpu_times()) + _children_cpu()
    began = time.monotonic()
    out = work / f"{name}.json"
    c = subprocess.Popen(
        client_argv(proc.port, args.streams, args.seconds, args.ramp, out, args.chunk_ms)
    )
    peak = idle
    while c.poll() is None:
        time.sleep(0.5)
        peak = max(peak, proc.rss_mb())
    wall = time.monotonic() - began
    data: dict[str, Any] = json.loads(out.read_text())
    user, system = (t - t0 for t, t0 in zip(proc.cpu_times(), (user0, sys0), strict=True))
    # The client and the fake upstream share one core: near all of it, chunks queue on
    # the load side, and that wait is measured as the proxy's delay.
    data["load_busy"] = (sum(upstream.cpu_times()) + _children_cpu() - load0) / wall
    data["rss_per_stream_kb"] = (peak - idle) * 1024 / args.streams
    data["cpu_us_per_chunk"] = (user + system) / max(data["chunks"], 1) * 1e6
    data["system_share"] = system / max(user + system, 1e-9)
    data["idle_mb"], data["peak_mb"] = idle, peak
    data["window"] = (time.time() - wall, time.time())
    return data


def gc_env(work: Path, name: str) -> dict[str, str]:
    """What makes a proxy record its collector's pauses (`bench/gc_probe`)."""
    probe = str(Path(__file__).parent / "gc_probe")
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": probe + (os.pathsep + path if path else ""),
        "BENCH_GC_PAUSES": str(work / f"{name}-gc.json"),
    }


def gc_line(work: Path, name: str, window: tuple[float, float]) -> str:
    """The collector's pauses while the streams ran: the longest stall every stream took."""
    file = work / f"{name}-gc.json"
    if not file.exists():
        return f"{name}: no record of its collector (it did not exit cleanly)"
    pauses = [p for p in json.loads(file.read_text()) if window[0] <= p[0] <= window[1]]
    if not pauses:
        return f"{name}: no collection of 0.5 ms or more"
    worst = max(pauses, key=lambda p: p[1])
    over = sum(1 for p in pauses if p[1] >= 5)
    return (
        f"{name}: {len(pauses)} collections of 0.5 ms or more, {over} of 5 ms or more;"
        f" the longest {worst[1]:.1f} ms (generation {worst[2]})"
    )


def chunk_ms(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def client_argv(
    port: int, streams: int, seconds: float, ramp: float, out: Path, every: str = "20-50"
) -> list[str]:
    return pinned(
        1,
        [
            sys.executable,
            "-m",
            "bench.streams",
            "--client-port",
            str(port),
            "--streams",
            str(streams),
            "--seconds",
            str(seconds),
            "--ramp",
            str(ramp),
            "--out",
            str(out),
            "--chunk-ms",
            every,
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=30, help="how long each stream lasts")
    p.add_argument("--ramp", type=float, default=5, help="seconds over which streams open")
    p.add_argument("--chunk-ms", default="20-50", help="a chunk every LO-HI ms, each stream")
    p.add_argument(
        "--without-budget", action="store_true", help="meterproxy meters, but no budget applies"
    )
    p.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.client_port:
        client(args.client_port, "/v1/chat/completions", args, Path(args.out))
        return
    if args.upstream_port:
        run_fast(serve_upstream(args.upstream_port))
        return
    # a proxy holds two sockets per stream (client side and upstream side)
    if 2 * args.streams + 200 > hard:
        raise SystemExit(
            f"{args.streams} streams need about {2 * args.streams + 200} open files in the"
            f" proxy; this machine's hard limit (ulimit -Hn) is {hard}"
        )
    work = Path(tempfile.mkdtemp(prefix="meterproxy-streams-"))
    ports = dict(zip(("upstream", "floor", "meterproxy"), free_ports(3), strict=True))
    up = f"http://127.0.0.1:{ports['upstream']}"
    config = {
        "server": {"host": "127.0.0.1", "port": ports["meterproxy"]},
        "upstreams": [{"name": "fake", "base_url": up + "/v1", "default": True}],
        "storage": {"url": f"sqlite:///{work / 'ledger.db'}"},
        "logging": {"file": str(work / "meterproxy.log"), "level": "INFO"},
    }
    if not args.without_budget:  # a budget: each stream metered as it flows
        config["budgets"] = {"agents": {"streamer": {"max_cost_per_day_usd": 1_000_000}}}
    (work / "meterproxy.yaml").write_text(json.dumps(config))
    py = sys.executable
    procs = {
        "upstream": Process(
            "fake upstream",
            pinned(1, [py, "-m", "bench.streams", "--upstream-port", str(ports["upstream"])]),
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
            env=gc_env(work, "floor"),
        ),
        "meterproxy": Process(
            "meterproxy",
            pinned(0, [py, "-m", "proxy", "serve", "--config", str(work / "meterproxy.yaml")]),
            ports["meterproxy"],
            work / "mp.log",
            env=gc_env(work, "meterproxy"),
        ),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        print(
            f"{args.streams} streams opened over {args.ramp:g} s, each a chunk every"
            f" {args.chunk_ms} ms"
            f" for {args.seconds:g} s; {'no budget' if args.without_budget else 'a day budget'};"
            f" proxies on core 0, client and upstream on core 1"
            f" (work directory {work})"
        )
        print(
            f"{'target':<11}{'ok':>7}{'failed':>8}{'chunks':>10}{'delay p50':>11}"
            f"{'p99 ms':>8}{'KB/stream':>11}{'CPU us/chunk':>14}{'kernel':>8}"
            f"{'RSS MB idle/peak':>19}{'load core':>11}"
        )
        windows = {}
        for name in ("floor", "meterproxy"):
            r = run_target(name, procs[name], procs["upstream"], args, work)
            windows[name] = r["window"]
            print(
                f"{name:<11}{r['ok']:>7.0f}{r['failed']:>8.0f}{r['chunks']:>10.0f}"
                f"{r['p50']:>11.2f}{r['p99']:>8.2f}{r['rss_per_stream_kb']:>11.1f}"
                f"{r['cpu_us_per_chunk']:>14.1f}{r['system_share']:>8.0%}"
                f"{r['idle_mb']:>10.0f}/{r['peak_mb']:<8.0f}{r['load_busy']:>10.0%}",
                flush=True,
            )
            if r["load_busy"] > 0.85:
                print(
                    f"{'':<11}the load side was {r['load_busy']:.0%} busy: its own queueing"
                    " is in this row's delays (fewer streams, or slower chunks)"
                )
            if r["reasons"]:
                print(f"{'':<11}failures: {r['reasons']}")
    finally:
        for proc in procs.values():
            proc.stop()
    print("The cycle collector's pauses while the streams ran (each stalls every stream):")
    for name, window in windows.items():
        print(f"  {gc_line(work, name, window)}")


if __name__ == "__main__":
    main()
