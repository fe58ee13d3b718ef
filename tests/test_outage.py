"""PostgreSQL going away under a running proxy, in both `on_storage_error` modes.

Closed (the default): calls of an agent under a block limit get 503 `meter_unavailable`;
others go through. Open: they all go through. Either way every call has exactly one
ledger row once the database is back (spooled meanwhile, then replayed), its spend
reaches the shared counters once, and the proxy reconnects by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml

from proxy.config import Config
from proxy.config_file import parse_config
from tests.conftest import Proxy, ProxyFactory
from tests.pg import TempPostgres, started_cluster
from tests.records import call_record

HI = [{"role": "user", "content": "hi"}]
CALL_PICO = 1_022_500_000  # 9 prompt tokens at $2.50/1M + 100 output tokens at $10/1M
TOKEN = "outage-admin-token-0123456789"
BUDGETS = "budgets:\n  agents:\n    capped: {max_cost_per_day_usd: 1}\n"


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[TempPostgres]:
    """A cluster of this module's own: its tests stop and start it."""
    pg = started_cluster()
    yield pg
    pg.destroy()


def sdk(proxy: Proxy, agent: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="sk-x",
                              max_retries=0)  # fmt: skip


async def call(proxy: Proxy, agent: str) -> None:
    await sdk(proxy, agent).chat.completions.create(model="gpt-4o", messages=HI, max_tokens=100)


async def until(check: Any, seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def outage_proxy(make_proxy: ProxyFactory, pg: TempPostgres, mode: str) -> Proxy:
    parsed = parse_config(yaml.safe_load(BUDGETS))
    return await make_proxy(
        policies=parsed.policies, db_url=pg.create_database(), on_storage_error=mode,
        admin_token=TOKEN,
    )  # fmt: skip


async def counters(proxy: Proxy, agent: str) -> list[tuple[Any, ...]]:
    return await proxy.svc.storage.fetch(
        "SELECT used, reserved FROM budget_counters WHERE scope = ? AND kind = 'cost:day'",
        [f"agent:{agent}"],
    )


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_database_outage(
    make_proxy: ProxyFactory, fake: Any, own_postgres: TempPostgres, mode: str, caplog: Any
) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9, completion_tokens=100)
    proxy = await outage_proxy(make_proxy, own_postgres, mode)
    await call(proxy, "capped")
    await call(proxy, "free")

    own_postgres.stop()
    try:
        if mode == "closed":
            with pytest.raises(openai.InternalServerError) as e:
                await call(proxy, "capped")
            assert e.value.status_code == 503
            body = e.value.body
            assert body["code"] == "meter_unavailable"  # type: ignore[index]
            assert body["type"] == "meter_unavailable"  # type: ignore[index]
            assert "agent 'capped' has a block budget" in body["message"]  # type: ignore[index]
            assert e.value.response.headers["x-should-retry"] == "true"
            assert e.value.response.headers["Retry-After"] == "2"
        else:
            await call(proxy, "capped")
        for _ in range(3):
            await call(proxy, "free")  # no block budget: goes through in both modes
        assert spool_files(proxy.config.spool_dir) and proxy.svc.ledger.offline
        # The admin API says what is wrong, in the same error shape.
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as s:
            async with s.get(proxy.url + "/meter/health") as r:
                health = await r.json()
                assert r.status == 200
                assert (health["status"], health["database"]) == ("degraded", "unreachable")
                assert health["spooled_rows"] >= 3
            async with s.get(proxy.url + "/metrics") as r:
                assert "\nmeterproxy_database_up 0.0\n" in await r.text()
            async with s.get(proxy.url + "/meter/spend?by=agent") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "5"
                error = (await r.json())["error"]
                assert error["code"] == "meter_unavailable"
                assert error["message"].startswith("meterproxy: the database cannot be reached")
    finally:
        own_postgres.start()

    # Reconnects by itself: the spool is replayed and new calls are checked again.
    await until(lambda: _replayed(proxy))
    await until(lambda: _admits(proxy))
    await proxy.flushed()
    rows = await proxy.svc.storage.recent_calls(100)
    assert len(rows) == len({r["id"] for r in rows})  # none doubled
    capped = [r for r in rows if r["agent"] == "capped"]
    free = [r for r in rows if r["agent"] == "free"]
    assert len(free) == 4 and all(r["status"] == 200 for r in free)
    assert len(upstream.requests) == len([r for r in rows if r["status"] == 200])
    if mode == "closed":
        # Refused while it was down (and while the test polled for the way back).
        statuses = {r["status"] for r in capped}
        assert statuses == {200, 503}
        assert all(r["refused"] == 1 and r["cost_pico"] == 0 for r in capped if r["status"] == 503)
    else:
        assert all(r["status"] == 200 for r in capped)
    # Spend reached the shared counters exactly once per answered call.
    n_capped = len([r for r in capped if r["status"] == 200])
    assert await counters(proxy, "capped") == [(n_capped * CALL_PICO, 0)]
    assert await counters(proxy, "free") == [(4 * CALL_PICO, 0)]
    assert "rows go to the spool" in caplog.text
    assert "the database is reachable again" in caplog.text


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def write_spool_file(directory: Path, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dead-replica-1.jsonl").write_bytes(data)


async def _replayed(proxy: Proxy) -> bool:
    return not proxy.svc.ledger.offline and not spool_files(proxy.config.spool_dir)


async def _admits(proxy: Proxy) -> bool:
    try:
        await call(proxy, "capped")
    except openai.InternalServerError:
        return False
    return True


async def test_a_spool_left_by_a_dead_replica_is_replayed_once(
    make_proxy: ProxyFactory, own_postgres: TempPostgres, tmp_path: Path
) -> None:
    proxy = await outage_proxy(make_proxy, own_postgres, "closed")
    record = call_record(
        "req_left_behind",
        proxy.svc.clock(),
        agent="free",
        upstream="fake",
        input_tokens=9,
        output_tokens=100,
        cost_pico=CALL_PICO,
    )
    line = orjson.dumps(record.as_row()) + b"\n"
    # The same row twice (a replay interrupted after its commit), and a torn last line.
    write_spool_file(proxy.config.spool_dir, line + line + line[:20])
    await until(lambda: _gone(proxy.config.spool_dir))
    rows = await proxy.svc.storage.recent_calls(10)
    assert [r["id"] for r in rows] == ["req_left_behind"]
    assert await counters(proxy, "free") == [(CALL_PICO, 0)]


async def _gone(spool: Path) -> bool:
    return not spool_files(spool)


def test_default_config_fails_closed() -> None:
    assert Config().on_storage_error == "closed"
