"""`python -m bench.instructions`: instructions per call, meterproxy and the floor.

Calls per second on a shared 2-core machine drift 25-30% between runs minutes apart, so a
change worth 1-3% cannot be seen in them. The instructions a process executes per call
can: valgrind's callgrind counts them, and two runs of the same code differ by up to
about 1%, so a change of a percent or two needs two or more runs of each commit, in turn.
Each target runs under callgrind (pinned to core 0, about 50 times slower than
natively), gets a warm-up, then `--calls` calls, 4 at a time, from a client on core 1;
the count covers those calls only (callgrind_control zeroes it before and dumps it
after), the writer thread included. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.__main__ import (
    HEADERS,
    PATH,
    SCENARIOS,
    Process,
    free_port,
    meterproxy_config,
    pinned,
    table,
)

_WARM_UP_CALLS = 300
_CONCURRENCY = 4


async def _calls(port: int, body: dict[str, object], count: int) -> None:
    """`count` calls, `_CONCURRENCY` at a time, each read to its end."""
    data = json.dumps(body).encode()
    headers = {**HEADERS, "Content-Type": "application/json"}
    left = count
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(
                    f"http://127.0.0.1:{port}{PATH}", data=data, headers=headers
                ) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"port {port} answered {r.status}")

        await asyncio.gather(*(worker() for _ in range(_CONCURRENCY)))


def _callgrind_control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def count(argv: list[str], port: int, body: dict[str, object], calls: int, out: Path) -> int:
    """Instructions per call of the server `argv` (listening on `port`)."""
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
                "--dump-instr=no"]  # fmt: skip
    proc = Process(argv[0], pinned(0, valgrind + argv), port, out.with_suffix(".log"))
    try:
        proc.wait_ready(180)
        asyncio.run(_calls(port, body, _WARM_UP_CALLS))
        _callgrind_control("-z", proc.proc.pid)
        asyncio.run(_calls(port, body, calls))
        _callgrind_control("-d", proc.proc.pid)
        dump = Path(f"{out}.{proc.proc.pid}.1")
        for _ in range(100):
            if dump.exists() and "summary:" in dump.read_text():
                break
            time.sleep(0.1)
        for line in dump.read_text().splitlines():
            if line.startswith("summary:"):
                return round(int(line.split()[1]) / calls)
        raise SystemExit(f"no summary in {dump}")
    finally:
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="counted calls per scenario")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="default: json and stream, usage asked")  # fmt: skip
    parser.add_argument("--without-floor", action="store_true")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the callgrind dumps (for callgrind_annotate) and say where",
    )
    args = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("valgrind is needed (apt-get install valgrind)")
    scenarios = args.scenario or ["json", "stream, usage asked"]
    workdir = Path(tempfile.mkdtemp(prefix="meterproxy-instructions-"))
    py = sys.executable
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    upstream = Process("fake upstream",
                       pinned(1, [py, "-m", "bench.fake_upstream", "--port", str(up_port)]),
                       up_port, workdir / "upstream.log")  # fmt: skip
    rows: list[list[str]] = []
    try:
        upstream.wait_ready()
        for scenario in scenarios:
            body = SCENARIOS[scenario]
            counts = {}
            for name in ["meterproxy"] + ([] if args.without_floor else ["floor"]):
                port = free_port()
                run_dir = workdir / f"{name}-{len(rows)}"
                run_dir.mkdir()
                if name == "floor":
                    argv = [py, "-m", "bench.forwarder", "--port", str(port),
                            "--upstream", upstream_url]  # fmt: skip
                else:
                    config = run_dir / "meterproxy.yaml"
                    config.write_text(json.dumps(meterproxy_config(port, upstream_url, run_dir)))
                    argv = [py, "-m", "proxy", "serve", "--config", str(config)]
                counts[name] = count(argv, port, body, args.calls, run_dir / "callgrind")
                print(f"{scenario:<20} {name:<10} {counts[name]:>10,} instructions per call",
                      flush=True)  # fmt: skip
            floor = counts.get("floor")
            rows.append([scenario, f"{counts['meterproxy']:,}",
                         f"{floor:,}" if floor else "-",
                         f"{counts['meterproxy'] / floor:.2f}" if floor else "-"])  # fmt: skip
    finally:
        upstream.stop()
        if args.keep:
            print(f"callgrind dumps kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(["scenario", "meterproxy", "floor", "meterproxy ÷ floor"], rows))


if __name__ == "__main__":
    main()
