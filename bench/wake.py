"""`python -m bench.wake`: what the first work after an idle gap costs on this machine.

At low call rates every call starts from an idle process: the latency figures at 20
calls/s measure this as much as any code. For gaps of 0, 5 and 50 ms before each try, on
one pinned core (as the bench pins the proxies), it times a trivial system call, a round
trip to a thread and back through the event loop (what waiting for the ledger's writer
thread costs), and a one-row SQLite commit in WAL mode as the ledger makes it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from queue import SimpleQueue

GAPS_MS = (0.0, 5.0, 50.0)


def _row_commit(path: Path) -> Callable[[], None]:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE calls (seq INTEGER PRIMARY KEY, id TEXT, agent TEXT,"
                 " started_at REAL, cost INTEGER)")  # fmt: skip
    conn.execute("CREATE INDEX calls_started ON calls (started_at)")
    conn.execute("CREATE INDEX calls_agent ON calls (agent, started_at)")
    n = [0]

    def commit() -> None:
        n[0] += 1
        conn.execute("INSERT INTO calls (id, agent, started_at, cost) VALUES (?, ?, ?, ?)",
                     (f"req_{n[0]}", "agent", time.time(), n[0]))  # fmt: skip

    return commit


async def _measure(tries: int, gap: float, work: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(tries):
        await asyncio.sleep(gap)  # 0: one pass of the loop, no idle
        started = time.perf_counter()
        result = work()
        if asyncio.isfuture(result):
            await result
        out.append((time.perf_counter() - started) * 1e6)
    return out


async def main(tries: int) -> None:
    loop = asyncio.get_running_loop()
    jobs: SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None] = SimpleQueue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            fn, future = job
            fn()
            loop.call_soon_threadsafe(future.set_result, None)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()

    def on_thread(fn: Callable[[], None]) -> Callable[[], asyncio.Future[None]]:
        def go() -> asyncio.Future[None]:
            future: asyncio.Future[None] = loop.create_future()
            jobs.put((fn, future))
            return future

        return go

    with tempfile.TemporaryDirectory() as tmp:
        commit = _row_commit(Path(tmp) / "wake.db")
        fd = os.open(tmp, os.O_RDONLY)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("fstat (one system call)", lambda: os.fstat(fd)),
            ("thread round trip", on_thread(lambda: None)),
            ("SQLite row commit on the thread", on_thread(commit)),
        ]
        print(f"{'':34}" + "".join(f"{f'after {g:g} ms idle':>22}" for g in GAPS_MS))
        print(f"{'(p50 / p90, us)':34}")
        for name, work in cases:
            cells = []
            for gap_ms in GAPS_MS:
                times = sorted(await _measure(tries, gap_ms / 1000, work))
                p90 = times[int(len(times) * 0.9)]
                cells.append(f"{statistics.median(times):>11.0f} / {p90:<8.0f}")
            print(f"{name:34}" + "".join(f"{c:>22}" for c in cells))
        os.close(fd)
    jobs.put(None)
    thread.join()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=200, help="per case and gap")
    parser.add_argument("--core", type=int, default=0, help="the core to pin to (-1: none)")
    args = parser.parse_args()
    if args.core >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(max(1, min(args.tries, 10_000))))
