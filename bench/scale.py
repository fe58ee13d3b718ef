"""`python -m bench.scale`: throughput of `--workers 2` on PostgreSQL against one process on
SQLite (and one process on PostgreSQL, to separate the engine from the workers).

Every call is metered, budget-checked (a day limit on the agent, so each admission locks
its counters) and committed to the ledger before its last byte goes out. Only wrk is
pinned (core 1): the workers, PostgreSQL and the fake upstream share this machine's cores,
as they would on a real one. Rounds rotate the order of the setups; compare the medians
of one run. PostgreSQL runs in a throwaway cluster (initdb in a temp dir, loopback).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.__main__ import CLK_TCK, SCENARIOS, Process, free_port, table, wrk
from tests.pg import TempPostgres, find_bindir

SETUPS = ("sqlite, 1 process", "postgresql, 1 process", "postgresql, --workers 2")


def tree_cpu_seconds(root: int) -> float:
    """CPU time of a process and all its descendants (workers, PostgreSQL backends)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    wanted, total, changed = {root}, 0.0, True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    for pid in wanted:
        total += times.get(pid, 0.0)
    return total


def config(upstream_url: str, port: int, db_url: str, workdir: Path, budget: bool) -> Path:
    budgets = {"agents": {"bench-agent": {"max_cost_per_day_usd": 1_000_000}}} if budget else {}
    data = {
        "server": {"host": "127.0.0.1", "port": port},
        "upstreams": [{"name": "fake", "base_url": upstream_url + "/v1", "default": True}],
        "storage": {"url": db_url, "spool_dir": str(workdir / f"spool-{port}")},
        "logging": {"file": str(workdir / f"meterproxy-{port}.log"), "level": "INFO"},
        "budgets": budgets,
    }
    path = workdir / f"meterproxy-{port}.yaml"
    path.write_text(json.dumps(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--no-budget", action="store_true", help="the agent has no limit")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed (apt-get install wrk)")
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries are needed (apt-get install postgresql)")
    workdir = Path(tempfile.mkdtemp(prefix="meterproxy-scale-"))
    pg = TempPostgres(bindir)
    pg.init()
    pg.start()
    py = sys.executable
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    procs: dict[str, Process] = {}
    try:
        procs["upstream"] = Process(
            "fake upstream", [py, "-m", "bench.fake_upstream", "--port", str(up_port)], up_port,
            workdir / "upstream.log",
        )  # fmt: skip
        urls = {
            SETUPS[0]: f"sqlite:///{workdir / 'ledger.db'}",
            SETUPS[1]: pg.create_database(),
            SETUPS[2]: pg.create_database(),
        }
        for name in SETUPS:
            port = free_port()
            path = config(upstream_url, port, urls[name], workdir, not args.no_budget)
            argv = [py, "-m", "proxy", "serve", "--config", str(path)]
            if "workers" in name:
                argv += ["--workers", "2"]
            procs[name] = Process(name, argv, port, workdir / f"{port}.stderr")
        for p in procs.values():
            p.wait_ready()
        postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
        run(args, procs, workdir, postmaster)
    finally:
        for p in procs.values():
            p.stop()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    args: argparse.Namespace, procs: dict[str, Process], workdir: Path, postmaster: int
) -> None:
    body = SCENARIOS["json"]
    for name in SETUPS:
        wrk(procs[name].port, body, 2, workdir, args.connections)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in SETUPS}
    proxy_cpu: dict[str, list[float]] = {name: [] for name in SETUPS}
    db_cpu: dict[str, list[float]] = {name: [] for name in SETUPS}
    for r in range(args.rounds):
        order = SETUPS[r % len(SETUPS) :] + SETUPS[: r % len(SETUPS)]
        for name in order:
            pid = procs[name].proc.pid
            before = tree_cpu_seconds(pid), tree_cpu_seconds(postmaster)
            rate, total = wrk(procs[name].port, body, args.seconds, workdir, args.connections)
            proxy_cpu[name].append((tree_cpu_seconds(pid) - before[0]) / total)
            db_cpu[name].append((tree_cpu_seconds(postmaster) - before[1]) / total)
            rates[name].append(rate)
            print(f"round {r + 1} {name:<24} {rate:8.0f} calls/s", flush=True)
    base = statistics.median(rates[SETUPS[0]])
    print(
        f"\nThroughput (calls/s): wrk, {args.connections} connections, {args.rounds} rounds of"
        f" {args.seconds:g} s; agent {'without a limit' if args.no_budget else 'under a day limit'}"
    )
    rows = [
        [name, f"{statistics.median(v):.0f}", " ".join(f"{x:.0f}" for x in v),
         f"{statistics.median(v) / base:.2f}",
         f"{statistics.median(proxy_cpu[name]) * 1000:.2f}",
         f"{statistics.median(db_cpu[name]) * 1000:.2f}" if "postgresql" in name else "-"]
        for name, v in rates.items()
    ]  # fmt: skip
    head = ["setup", "median", "per round", "vs sqlite", "CPU ms/call proxy", "PostgreSQL"]
    print(table(head, rows))


if __name__ == "__main__":
    main()
