"""`python -m bench`: meterproxy against the thinnest aiohttp forwarder, on this machine.

Starts a fast fake upstream, the bare forwarder (the floor) and `meterproxy serve` with
everything on (metering, a day budget on the agent, the ledger with its durability
promise, INFO logs to a file). The proxies are pinned to core 0, the load generators and
the fake upstream to core 1. Throughput is measured with wrk (closed loop, 32
connections) in rounds that rotate floor and meterproxy; added latency with an open-loop
generator at a fixed rate. Figures drift between runs on a shared machine: compare the
ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import Result, build_request, open_loop

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGES = [
    {"role": "system", "content": "You are a support agent. Answer briefly."},
    {"role": "user", "content": "Customer says the app crashes on login after the last update."},
]
SCENARIOS = {
    "json": {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 64},
    "stream, usage asked": {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "stream, usage added": {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "max_tokens": 64,
        "stream": True,
    },
}
HEADERS = {"X-Agent-Id": "bench-agent", "X-Intent-Id": "bench-task"}
PATH = "/v1/chat/completions"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each socket stays bound until all are picked, or the
    kernel may hand the same port out twice (a server that then cannot bind, while its
    readiness check connects to whoever holds the port)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


def meterproxy_config(port: int, upstream_url: str, workdir: Path) -> dict[str, Any]:
    """Everything on: metering, a day budget on the agent, the ledger, INFO logs to a file."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [{"name": "fake", "base_url": upstream_url + "/v1", "default": True}],
        "storage": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "logging": {"file": str(workdir / "meterproxy.log"), "level": "INFO"},
        "budgets": {"agents": {"bench-agent": {"max_cost_per_day_usd": 1_000_000}}},
    }


def pinned(core: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") else []) + argv


class Process:
    def __init__(
        self, name: str, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.port = port
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_ready(self, seconds: float = 30) -> None:
        end = time.time() + seconds
        while time.time() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"{self.name} did not start")

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process, every thread."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def wrk(
    port: int, body: dict[str, Any], seconds: float, workdir: Path, connections: int = 32
) -> tuple[float, int]:
    script = workdir / "wrk.lua"
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(json.dumps(body))}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in HEADERS.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        pinned(
            1,
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(int(seconds), 1)}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}{PATH}",
            ],
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise SystemExit(f"wrk got {bad.group(1)} errors from port {port}:\n{out}")
    return rate, total


def latency(port: int, body: dict[str, Any], rate: float, seconds: float) -> Result:
    raw = build_request(port, PATH, json.dumps(body).encode(), HEADERS)
    return asyncio.run(open_loop(port, raw, rate, seconds))


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5, help="per wrk run")
    parser.add_argument("--rate", type=float, default=200, help="open-loop calls per second")
    parser.add_argument("--latency-seconds", type=float, default=10)
    parser.add_argument("--rss-calls", type=int, default=100_000)
    parser.add_argument(
        "--extras", action="store_true", help="also the 50 MB stream and 400 KB prompt"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--telemetry", action="store_true", help="meterproxy also exports OTLP to a local sink"
    )
    parser.add_argument(
        "--peer", choices=["litellm"], help="also measure this proxy (installed on first use)"
    )
    parser.add_argument(
        "--peer-rate", type=float, default=20, help="open-loop calls per second for the peer"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="meterproxy-bench-"))
    names = ("upstream", "floor", "meterproxy", "otlp", "litellm")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    upstream_url = f"http://127.0.0.1:{ports['upstream']}"
    config = meterproxy_config(ports["meterproxy"], upstream_url, workdir)
    if args.telemetry:
        config["telemetry"] = {"endpoint": f"http://127.0.0.1:{ports['otlp']}"}
    (workdir / "meterproxy.yaml").write_text(json.dumps(config))
    py = sys.executable
    procs = {
        "upstream": Process(
            "fake upstream",
            pinned(1, [py, "-m", "bench.fake_upstream", "--port", str(ports["upstream"])]),
            ports["upstream"],
            workdir / "upstream.log",
        ),
        "floor": Process(
            "floor",
            pinned(
                0,
                [
                    py,
                    "-m",
                    "bench.forwarder",
                    "--port",
                    str(ports["floor"]),
                    "--upstream",
                    upstream_url,
                ],
            ),
            ports["floor"],
            workdir / "floor.log",
        ),
        "meterproxy": Process(
            "meterproxy",
            pinned(0, [py, "-m", "proxy", "serve", "--config", str(workdir / "meterproxy.yaml")]),
            ports["meterproxy"],
            workdir / "meterproxy.stderr",
        ),
    }
    if args.telemetry:
        procs["otlp"] = Process(
            "otlp sink",
            pinned(1, [py, "-m", "bench.otlp_sink", "--port", str(ports["otlp"])]),
            ports["otlp"],
            workdir / "otlp.log",
        )
    try:
        if args.peer:
            from bench.peers import start_litellm

            procs["litellm"] = start_litellm(ports["litellm"], upstream_url, workdir)
            procs["litellm"].wait_ready(180)
        for p in procs.values():
            p.wait_ready()
        time.sleep(0.5)
        for p in procs.values():  # alive: not a port someone else answered on
            if p.proc.poll() is not None:
                raise SystemExit(f"{p.name} exited; see {p.log.name}")
        run(args, procs, ports, workdir)
    finally:
        for p in procs.values():
            p.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"\nwork directory kept: {workdir}")


def run(
    args: argparse.Namespace, procs: dict[str, Process], ports: dict[str, int], workdir: Path
) -> None:
    targets = ["floor", "meterproxy"] + (["litellm"] if args.peer else [])
    print(f"warm-up ... (work directory {workdir})", flush=True)
    for name in targets:
        wrk(ports[name], SCENARIOS["json"], 2, workdir)

    # -- throughput: wrk, closed loop, 32 connections, rounds rotating the order -------
    throughput: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    direct: dict[str, float] = {}
    for scenario, body in SCENARIOS.items():
        direct[scenario], _ = wrk(ports["upstream"], body, args.seconds, workdir)
    for r in range(args.rounds):
        order = targets if r % 2 == 0 else targets[::-1]
        for scenario, body in SCENARIOS.items():
            for name in order:
                before = procs[name].cpu_seconds()
                rate, total = wrk(ports[name], body, args.seconds, workdir)
                used = procs[name].cpu_seconds() - before
                throughput.setdefault((name, scenario), []).append(rate)
                cpu.setdefault((name, scenario), []).append(used / total)
                print(
                    f"round {r + 1} {scenario:<20} {name:<10} {rate:8.0f} calls/s  "
                    f"{used / total * 1000:.3f} ms CPU/call",
                    flush=True,
                )

    # -- added latency: open loop at a fixed rate ------------------------------------------
    lat: dict[tuple[str, str], Result] = {}

    def measure(names: tuple[str, ...], scenario: str, rate: float, key: str) -> None:
        """Each target in `names` order, then in reverse: two halves of the time each."""
        for name in names + names[::-1]:
            res = latency(ports[name], SCENARIOS[scenario], rate, args.latency_seconds / 2)
            if (name, key) in lat:
                lat[(name, key)].latencies += res.latencies
                lat[(name, key)].ttfb += res.ttfb
                lat[(name, key)].errors += res.errors
            else:
                lat[(name, key)] = res

    for scenario in ("json", "stream, usage added"):
        measure(("upstream", "floor", "meterproxy"), scenario, args.rate, scenario)
    if args.peer:
        measure(("upstream", "floor", "meterproxy", "litellm"), "json", args.peer_rate,
                "json, peer rate")  # fmt: skip
    # -- RSS after many calls ----------------------------------------------------------------
    mp_calls = ledger_rows(workdir)
    while mp_calls < args.rss_calls:
        wrk(ports["meterproxy"], SCENARIOS["json"], 5, workdir)
        mp_calls = ledger_rows(workdir)
    report(args, throughput, cpu, direct, lat, procs, mp_calls)
    if args.peer:
        from bench.peers import report_peer

        report_peer(args, throughput, lat, procs)
    if args.extras:
        extras(procs, ports)


def fake_stats(port: int) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /__stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            data += s.recv(65536)
    return json.loads(data.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def ledger_rows(workdir: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(workdir / "ledger.db")
    try:
        return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    finally:
        conn.close()


def table(head: list[str], rows: list[list[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def report(
    args: argparse.Namespace,
    throughput: dict[tuple[str, str], list[float]],
    cpu: dict[tuple[str, str], list[float]],
    direct: dict[str, float],
    lat: dict[tuple[str, str], Result],
    procs: dict[str, Process],
    calls: int,
) -> None:
    print(
        f"\nThroughput (calls/s): wrk, 32 connections, {args.rounds} rounds of {args.seconds:g} s,"
        " floor and meterproxy alternating; proxies on core 0, wrk and fake upstream on core 1"
    )
    rows = []
    for scenario in SCENARIOS:
        f = throughput[("floor", scenario)]
        m = throughput[("meterproxy", scenario)]
        ratios = [b / a for a, b in zip(f, m, strict=True)]
        rows.append(
            [
                scenario,
                f"{direct[scenario]:.0f}",
                f"{statistics.median(f):.0f}",
                f"{statistics.median(m):.0f}",
                f"{statistics.median(ratios):.2f}",
                " ".join(f"{x:.2f}" for x in ratios),
                f"{statistics.median(cpu[('floor', scenario)]) * 1000:.3f}",
                f"{statistics.median(cpu[('meterproxy', scenario)]) * 1000:.3f}",
            ]
        )
    head = ["scenario", "direct", "floor", "meterproxy", "ratio", "ratio per round",
            "CPU ms/call floor", "meterproxy"]  # fmt: skip
    print(table(head, rows))
    print(
        f"\nLatency (ms): open loop at {args.rate:g} calls/s, {args.latency_seconds:g} s per target"
        " in two interleaved halves; + is the difference to the direct call"
    )
    rows = []
    for scenario in ("json", "stream, usage added"):
        base = lat[("upstream", scenario)]
        for name in ("upstream", "floor", "meterproxy"):
            r = lat[(name, scenario)]
            rows.append(
                [
                    f"{scenario}, {'direct' if name == 'upstream' else name}",
                    ms(r.pct(r.latencies, 50)),
                    ms(r.pct(r.latencies, 90)),
                    ms(r.pct(r.latencies, 99)),
                    ms(r.pct(r.latencies, 50) - base.pct(base.latencies, 50)),
                    ms(r.pct(r.latencies, 99) - base.pct(base.latencies, 99)),
                    ms(r.pct(r.ttfb, 50)),
                    str(r.errors),
                ]
            )
        fl, ml = lat[("floor", scenario)], lat[("meterproxy", scenario)]
        rows.append(
            [
                f"{scenario}, meterproxy - floor",
                ms(ml.pct(ml.latencies, 50) - fl.pct(fl.latencies, 50)),
                "",
                ms(ml.pct(ml.latencies, 99) - fl.pct(fl.latencies, 99)),
                "",
                "",
                "",
                "",
            ]
        )
    print(table(["", "p50", "p90", "p99", "+p50", "+p99", "TTFB p50", "errors"], rows))
    mp, floor = procs["meterproxy"].rss_mb(), procs["floor"].rss_mb()
    print(f"\nRSS: meterproxy {mp:.0f} MB after {calls:,} calls; floor {floor:.0f} MB")


def extras(procs: dict[str, Process], ports: dict[str, int]) -> None:
    from bench.extras import big_prompt, big_stream

    print()
    big_stream(procs["meterproxy"], ports["meterproxy"])
    big_prompt(ports["meterproxy"])


if __name__ == "__main__":
    main()
