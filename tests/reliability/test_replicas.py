"""Several `meterproxy serve` processes on one PostgreSQL: one budget, one pause state.

Two replicas as real subprocesses (as behind a load balancer), and `--workers 2` (two
processes on one port). The guarantee of a block limit must hold across them exactly.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from tests.pg import free_port
from tests.reliability.proc import ADMIN, ProxyProcess

HI = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# Each call reserves $0.001025 (its prompt with the margin and its output cap) and costs
# $0.0010225. Three fit in $0.004 at once; then calls are clamped to what is left, then
# refused. Two replicas that did not share would each spend up to $0.004: $0.008 in all.
LIMIT_USD = "0.004"
RESERVED_PICO = 1_025_000_000  # 10 prompt tokens at $2.50/1M + 100 output tokens at $10/1M
BUDGETS = {"agents": {"research-agent": {"max_cost_per_day_usd": float(LIMIT_USD)}}}


def client(proxy: ProxyProcess, agent: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{proxy.url}/agents/{agent}/v1", api_key="sk-x", max_retries=0
    )


async def rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT * FROM calls ORDER BY seq"))
    finally:
        await conn.close()


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def test_two_replicas_hold_one_budget_and_one_pause(
    fake: Any, pg_url: str, tmp_path: Path
) -> None:
    upstream, fake_url = fake
    # Every call uses its whole output cap and is slow: calls on both replicas overlap.
    upstream.script.update(prompt_tokens=9, completion_tokens=100, delay=0.1)
    a = ProxyProcess(tmp_path, fake_url, db_url=pg_url, budgets=BUDGETS, name="a")
    b = ProxyProcess(tmp_path, fake_url, db_url=pg_url, budgets=BUDGETS, name="b")
    await asyncio.gather(a.start(), b.start())
    try:
        clients = [client(a, "research-agent"), client(b, "research-agent")]

        async def one(i: int) -> str:
            try:
                await clients[i % 2].chat.completions.create(
                    model="gpt-4o", messages=HI, max_tokens=100
                )
                return "ok"
            except openai.RateLimitError as e:
                assert e.body["code"] == "max_cost_per_day_usd"  # type: ignore[index]
                return "refused"

        results = await asyncio.gather(*(one(i) for i in range(200)))
        admitted = results.count("ok")
        ledger = await rows(pg_url)
        assert len(ledger) == 200  # one row per call, whichever replica answered it
        spent = sum(r["cost_pico"] for r in ledger)
        # Three fit at once as asked; later ones only capped at what was left.
        reserved = [r["reserved_pico"] for r in ledger if not r["refused"]]
        assert reserved.count(RESERVED_PICO) >= 3 and max(reserved) == RESERVED_PICO
        assert len(upstream.requests) == admitted >= 3
        # 9 prompt tokens at $2.50/1M and each call's output (its cap) at $10/1M.
        assert spent == sum(22_500_000 + min(cap or 100, 100) * 10_000_000
                            for cap in upstream.caps)  # fmt: skip
        assert spent <= int(float(LIMIT_USD) * 10**12)  # the guarantee, across replicas
        assert await fetch(pg_url, "SELECT COUNT(*) FROM reservations") == [(0,)]
        day = await fetch(
            pg_url,
            "SELECT used, reserved FROM budget_counters"
            " WHERE scope = 'agent:research-agent' AND kind = 'cost:day'",
        )
        assert [tuple(r) for r in day] == [(spent, 0)]

        # A pause through one replica stops the agent on the other at once.
        await client(b, "helper").chat.completions.create(model="gpt-4o", messages=HI)
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.post(a.url + "/meter/agents/helper/pause", json={"reason": "audit"}) as r:
                assert r.status == 200
            with pytest.raises(openai.RateLimitError) as e:
                await client(b, "helper").chat.completions.create(model="gpt-4o", messages=HI)
            assert e.value.body["code"] == "agent_paused"  # type: ignore[index]
            assert "audit" in e.value.body["message"]  # type: ignore[index]
            async with s.post(b.url + "/meter/agents/helper/resume") as r:
                assert r.status == 200
        await client(a, "helper").chat.completions.create(model="gpt-4o", messages=HI)
    finally:
        for proxy in (a, b):
            proxy.signal(signal.SIGTERM)
        codes = [await a.wait(), await b.wait()]
    assert codes == [0, 0]


async def test_workers_share_one_port_and_stop_together(
    fake: Any, pg_url: str, tmp_path: Path
) -> None:
    _, fake_url = fake
    port = free_port()
    proxy = ProxyProcess(tmp_path, fake_url, db_url=pg_url, args=("--workers", "2"), port=port)
    await proxy.start()
    try:
        for _ in range(200):  # start() saw one worker listen; the other may still be starting
            if proxy.log.count("listening on") == 2:
                break
            await asyncio.sleep(0.05)
        replicas = set()
        for _ in range(200):  # new connections: the kernel spreads them over the workers
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                async with s.get(proxy.url + "/meter/health") as r:
                    replicas.add((await r.json())["replica"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2
        await client(proxy, "w").chat.completions.create(model="gpt-4o", messages=HI)
    finally:
        proxy.signal(signal.SIGTERM)
        code = await proxy.wait()
    assert code == 0
    assert proxy.log.count("listening on") == 2
    assert len(await rows(pg_url)) == 1


async def test_workers_refused_on_sqlite(fake: Any, tmp_path: Path) -> None:
    _, fake_url = fake
    proxy = ProxyProcess(tmp_path, fake_url, args=("--workers", "2"), port=free_port())
    with pytest.raises(AssertionError, match="exited at startup"):
        await proxy.start()
    assert await proxy.wait() == 2
    assert "--workers 2 needs PostgreSQL" in proxy.log
    assert "with SQLite (sqlite:///" in proxy.log
