"""The durability promise and graceful shutdown, on a real `meterproxy serve` process.

Every call whose response the client received in full has exactly one committed ledger
row, even when the proxy is killed with SIGKILL right after; SIGTERM drains calls in flight
within the grace period and exits 0; a second SIGTERM, or the grace running out, cancels
what is left and still records it.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ROOT
from tests.reliability.proc import ADMIN, ProxyProcess

HI = [{"role": "user", "content": "hi"}]


async def one_call(
    session: aiohttp.ClientSession, url: str, stream: bool, agent: str
) -> tuple[str | None, bool]:
    """(request id, received in full) for one call."""
    body = {"model": "gpt-4o", "messages": HI, "max_tokens": 50, "stream": stream}
    request_id = None
    try:
        async with session.post(
            url + "/v1/chat/completions", json=body, headers={"X-Agent-Id": agent}
        ) as r:
            request_id = r.headers.get("x-meter-request-id")
            if r.status != 200:
                return request_id, False
            data = await r.read()
            if stream:
                return request_id, data.rstrip().endswith(b"data: [DONE]")
            return request_id, json.loads(data)["choices"][0]["message"]["content"] == "Hello"
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return request_id, False


async def test_sigkill_mid_load_loses_no_received_call(fake: Any, tmp_path: Path) -> None:
    upstream, fake_url = fake
    upstream.script.update(chunk_delay=0.01, chunks=8, delay=0.005)
    proxy = ProxyProcess(tmp_path, fake_url)
    await proxy.start()
    outcomes: list[tuple[str | None, bool]] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        rnd = random.Random(i)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while not stop.is_set():
                outcomes.append(
                    await one_call(session, proxy.url, rnd.random() < 0.5, f"agent-{i % 4}")
                )

    clients = [asyncio.create_task(client(i)) for i in range(32)]
    await asyncio.sleep(2.0)
    stop.set()  # clients start no new call; the ones in flight are cut by the kill
    proxy.signal(signal.SIGKILL)  # no flush, no goodbye
    await proxy.wait()
    await asyncio.gather(*clients)

    received = {rid for rid, full in outcomes if full and rid}
    cut = [rid for rid, full in outcomes if not full]
    restarted = ProxyProcess(tmp_path, fake_url)
    await restarted.start()
    try:
        rows = restarted.rows()
        ids = [r["id"] for r in rows]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as s:
            async with s.get(restarted.url + "/meter/health") as r:
                health = await r.json()
            async with s.get(restarted.url + "/meter/agents") as r:
                agents = {a["agent"]: a for a in (await r.json())["agents"]}
    finally:
        restarted.signal(signal.SIGTERM)
        assert await restarted.wait() == 0

    missing = received - set(ids)
    duplicates = len(ids) - len(set(ids))
    forwarded = [r for r in rows if r["llm_calls"] == 1]
    summary = {
        "calls": len(outcomes), "received_in_full": len(received), "cut_by_the_kill": len(cut),
        "ledger_rows": len(rows), "upstream_requests": len(upstream.requests),
        "rows_lost": len(missing), "duplicate_rows": duplicates,
        "reservations_after_restart": health["outstanding_reservations"],
    }  # fmt: skip
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "crash-test.json").write_text(json.dumps(summary, indent=2))
    assert len(received) > 200 and len(cut) >= 8, summary
    assert missing == set(), summary  # no fully received call without its row
    assert duplicates == 0 and len(forwarded) <= len(upstream.requests), summary
    assert health["outstanding_reservations"] == 0
    # Spend rebuilt after the restart equals the ledger's, to the pico-dollar.
    for agent, status in agents.items():
        ledger_cost = sum(r["cost_pico"] or 0 for r in rows if r["agent"] == agent)
        assert status["windows"]["day"]["spent_usd"] == _usd(ledger_cost), agent
    assert all(r["usage_source"] in ("provider", "estimated", "none") for r in rows)


def _usd(pico: int) -> str:
    from proxy.money import usd_exact

    return usd_exact(pico)


async def test_sigterm_drains_calls_in_flight_and_exits_0(fake: Any, tmp_path: Path) -> None:
    upstream, fake_url = fake
    upstream.script.update(chunk_delay=0.1, chunks=10)  # each stream lasts about a second
    proxy = ProxyProcess(tmp_path, fake_url, shutdown_grace_seconds=10)
    await proxy.start()
    async with aiohttp.ClientSession() as session:
        calls = [
            asyncio.create_task(one_call(session, proxy.url, True, "drain")) for _ in range(10)
        ]
        while upstream.chunks_sent < 10:  # every stream has started
            await asyncio.sleep(0.01)
        proxy.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # No new calls once stopping.
        refused = await one_call(session, proxy.url, False, "late")
        results = await asyncio.gather(*calls)
    assert await proxy.wait() == 0
    assert all(full for _, full in results) and refused == (None, False)
    rows = proxy.rows()
    assert sorted(r["id"] for r in rows) == sorted(rid for rid, _ in results if rid)
    assert all(r["status"] == 200 and r["usage_source"] == "provider" for r in rows)
    assert "stopping: waiting up to 10s for 10 calls in flight" in proxy.log
    assert "stopped" in proxy.log


async def test_second_sigterm_cancels_and_still_records(fake: Any, tmp_path: Path) -> None:
    upstream, fake_url = fake
    upstream.script.update(chunk_delay=0.5, chunks=40)  # 20 s streams
    proxy = ProxyProcess(tmp_path, fake_url, shutdown_grace_seconds=60)
    await proxy.start()
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(one_call(session, proxy.url, True, "long")) for _ in range(5)]
        while upstream.chunks_sent < 10:
            await asyncio.sleep(0.01)
        proxy.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        proxy.signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
    assert await proxy.wait(10) == 0
    assert not any(full for _, full in results)
    rows = proxy.rows()
    assert len(rows) == 5
    assert all(
        r["error"] == "cancelled at shutdown" and r["usage_source"] == "estimated" for r in rows
    )
    assert all(r["output_tokens"] > 0 for r in rows)  # what had been generated is counted
    assert "second signal: cancelling 5 calls in flight" in proxy.log


async def test_grace_running_out_cancels_and_still_records(fake: Any, tmp_path: Path) -> None:
    upstream, fake_url = fake
    upstream.script.update(chunk_delay=0.5, chunks=40)
    proxy = ProxyProcess(tmp_path, fake_url, shutdown_grace_seconds=0.5)
    await proxy.start()
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(one_call(session, proxy.url, True, "slow")) for _ in range(4)]
        while len(upstream.requests) < 4:
            await asyncio.sleep(0.01)
        proxy.signal(signal.SIGTERM)
        await asyncio.gather(*calls)
    assert await proxy.wait(10) == 0
    rows = proxy.rows()
    assert len(rows) == 4 and all(r["error"] == "cancelled at shutdown" for r in rows)
    assert "grace of 0.5s over: cancelling 4 calls in flight" in proxy.log
