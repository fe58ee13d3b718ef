"""Report query time on a big ledger: `python -m bench.report_query [--rows 1000000]`.

Builds a SQLite ledger of N call rows (30 days, 20 agents, 6 models, intents of ~20 calls)
through the real storage layer (which keeps the rollups), then times the reports the
dashboard and `meterproxy report` run. The ledger is cached in --db between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from proxy.budgets import Calendar

from proxy.records import CallRecord
from proxy.reports import Report, spend_report
from proxy.storage import open_storage

MODELS = ["gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4-5", "gemini-2.5-flash", "gpt-5"]


def rows(n: int, end: float, seed: int = 7) -> list[CallRecord]:
    rnd = random.Random(seed)
    start = end - 30 * 86400
    out = []
    for i in range(n):
        t = start + (end - start) * i / n
        agent = f"agent-{rnd.randrange(20):02d}"
        tokens_in, tokens_out = rnd.randrange(100, 4000), rnd.randrange(10, 800)
        out.append(
            CallRecord(
                id=f"bench-{i}",
                started_at=t,
                ended_at=t + 0.8,
                agent=agent,
                intent=f"{agent}-task-{i // 20}",
                upstream="openai",
                endpoint="chat/completions",
                method="POST",
                model_requested=rnd.choice(MODELS),
                model_served=None,
                model_priced="gpt-4o",
                status=200,
                stream=bool(i % 2),
                input_tokens=tokens_in,
                cached_input_tokens=0,
                output_tokens=tokens_out,
                reasoning_tokens=0,
                cache_write_tokens=0,
                cost_pico=tokens_in * 2_500_000 + tokens_out * 10_000_000,
                usage_source="provider",
                service_tier=None,
                price_version="bench",
                latency_ms=800.0,
                ttfb_ms=200.0,
                error=None,
                llm_calls=1,
                refused=False,
                reserved_pico=0,
            )
        )
    return out


async def build(db: Path, n: int, end: float) -> None:
    storage = await open_storage(f"sqlite:///{db}")
    try:
        if await storage.count_calls() >= n:
            return
        t0 = time.perf_counter()
        records = rows(n, end)
        batch = 20_000
        for i in range(0, n, batch):
            await storage.write_calls(records[i : i + batch])
        print(f"built {n:,} rows in {time.perf_counter() - t0:.1f}s -> {db}")
    finally:
        await storage.close()


async def timed(label: str, pending: Awaitable[Report]) -> None:
    t0 = time.perf_counter()
    report = await pending
    ms = (time.perf_counter() - t0) * 1000
    total = report.to_json()["total"]["cost_usd"]
    print(f"{label:<44} {ms:8.1f} ms  ({len(report.rows):>5} rows, total ${total})")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", default="/tmp/meterproxy-bench-ledger.db")
    args = parser.parse_args()
    end = 1_796_000_000.0  # fixed, so the cached ledger stays valid
    db = Path(args.db)
    if os.environ.get("REBUILD"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{db}{suffix}")
    await build(db, args.rows, end)
    storage = await open_storage(f"sqlite:///{db}")
    cal = Calendar("Europe/Berlin")
    day = 86400
    cases: list[tuple[str, dict[str, Any]]] = [
        ("day by agent, all 30 days", {"by": "agent", "window": "day"}),
        (
            "day by agent, last 7 days, ragged edges",
            {"by": "agent", "window": "day", "since": end - 7 * day + 123, "until": end - 77},
        ),
        ("month by model", {"by": "model", "window": "month"}),
        (
            "hour by agent, last 24h, one agent",
            {"by": "agent", "window": "hour", "since": end - day, "agent": "agent-03"},
        ),
        ("by intent, last 24h (from call rows)", {"by": "intent", "since": end - day}),
    ]
    try:
        n = await storage.count_calls()
        print(f"ledger: {n:,} call rows")
        for _ in range(2):  # the second round shows warm-cache figures
            for label, query in cases:
                await timed(label, spend_report(storage, cal, **query))
    finally:
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main())
