"""Budgets end to end: refusals as the SDK sees them, concurrency, restarts, admin API."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.admission import intent_key
from proxy.app import Options
from proxy.budget_views import status as budget_status
from proxy.config import Config
from proxy.config_file import parse_config
from tests.conftest import FakeClock, Proxy, ProxyFactory

HI = [{"role": "user", "content": "hi"}]
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def ledger_url(db_url: str) -> str:
    """Every test here runs on SQLite (one process) and on PostgreSQL (shared budgets)."""
    return db_url


def with_budgets(proxy_config: Config, text: str) -> dict[str, Any]:
    parsed = parse_config(yaml.safe_load(text))
    return {"policies": parsed.policies, "timezone": parsed.timezone, "admin_token": TOKEN}


async def budget_proxy(make_proxy: ProxyFactory, text: str, **kw: Any) -> Proxy:
    return await make_proxy(**with_budgets(Config(), text), **kw)


def sdk(proxy: Proxy, agent: str = "research-agent", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="sk-x", **kw)


async def test_refusal_as_the_openai_sdk_sees_it(make_proxy: ProxyFactory, fake: Any,
                                                 clock: FakeClock) -> None:  # fmt: skip
    upstream, _ = fake
    proxy = await budget_proxy(
        make_proxy,
        "budgets:\n  agents:\n    research-agent: {max_cost_per_day_usd: 0.0002}\n",
        options=Options(clock=clock),
    )
    # gpt-4: its prompt alone (10 tokens with the margin, x $30/1M) is $0.0003: no output
    # cap makes it fit in $0.0002.
    client = sdk(proxy)  # default max_retries=2: the SDK would retry a plain 429
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model="gpt-4", messages=HI, max_tokens=100)
    response = e.value.response
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-meter-limit"] == "max_cost_per_day_usd"
    assert response.headers["x-meter-remaining-usd"] == "0.0002"
    assert int(response.headers["Retry-After"]) > 0
    body = response.json()["error"]
    assert set(body) == {"message", "type", "code", "param"}
    assert (body["type"], body["code"], body["param"]) == (
        "budget_exceeded", "max_cost_per_day_usd", None,
    )  # fmt: skip
    # 10 x $30/1M + 100 x $60/1M: the call as asked.
    assert body["message"].startswith(
        "agent 'research-agent' reached max_cost_per_day_usd: used $0.00000 of $0.00020;"
        " this call could cost up to $0.00630 but only $0.00020 remains; resets at"
    )
    assert upstream.requests == []
    rows = await proxy.rows()
    assert len(rows) == 1  # asked once: the SDK did not retry
    assert (rows[0]["status"], rows[0]["refused"], rows[0]["cost_pico"]) == (429, 1, 0)


async def test_a_stream_is_refused_before_it_starts(make_proxy: ProxyFactory) -> None:
    proxy = await budget_proxy(make_proxy, "budgets:\n  defaults: {max_cost_per_day_usd: 0.0001}\n")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": HI, "stream": True}) as r:  # fmt: skip
            assert r.status == 429
            assert r.headers["Content-Type"].startswith("application/json")
            assert (await r.json())["error"]["code"] == "max_cost_per_day_usd"


@pytest.mark.parametrize("limit", ["0.01", "0.0173"])
async def test_concurrent_calls_never_exceed_a_block_limit(
    make_proxy: ProxyFactory, fake: Any, limit: str
) -> None:
    upstream, _ = fake
    # Every call really uses its whole output cap, and is slow, so calls overlap.
    upstream.script.update(prompt_tokens=9, completion_tokens=100, delay=0.05, chunk_delay=0.005)
    proxy = await budget_proxy(
        make_proxy, f"budgets:\n  agents:\n    research-agent: {{max_cost_per_day_usd: {limit}}}\n"
    )
    client = sdk(proxy, max_retries=0)

    async def one(i: int) -> str:
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="gpt-4o", messages=HI, max_tokens=100, stream=True
                )
                async for _ in stream:
                    pass
            else:
                await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=100)
            return "ok"
        except openai.RateLimitError as e:
            assert e.body["code"] == "max_cost_per_day_usd"  # type: ignore[index]
            assert e.response.headers["x-should-retry"] == "false"
            return "refused"

    results = await asyncio.gather(*(one(i) for i in range(200)))
    rows = await proxy.rows()
    assert len(rows) == 200
    spent = sum(r["cost_pico"] for r in rows)
    limit_pico = int(float(limit) * 10**12 + 0.5)
    assert spent <= limit_pico
    admitted = results.count("ok")
    assert 1 <= admitted < 200 and results.count("refused") == 200 - admitted
    assert len(upstream.requests) == admitted
    # Each admitted call cost exactly 9 * $2.50 + its output * $10.00 per 1M: 100 tokens,
    # or fewer for a call whose cap was clamped to what the budget still afforded.
    outputs = [min(cap or 100, 100) for cap in upstream.caps]
    assert spent == sum(22_500_000 + n * 10_000_000 for n in outputs)
    assert outputs.count(100) >= admitted // 2
    assert proxy.svc.enforcer.outstanding == 0 and proxy.svc.enforcer.outstanding_pico == 0
    storage = proxy.svc.storage
    if storage.shared:  # the database's own counters agree, and hold no reservation
        assert await storage.fetch("SELECT COUNT(*) FROM reservations") == [(0,)]
        day = await storage.fetch(
            "SELECT used, reserved FROM budget_counters WHERE scope = ? AND kind = 'cost:day'",
            ["agent:research-agent"],
        )
        assert day == [(spent, 0)]


async def test_pause_policies_and_spend_survive_a_restart(
    make_proxy: ProxyFactory, fake: Any, tmp_path: Path, clock: FakeClock
) -> None:
    text = "budgets:\n  defaults: {max_cost_per_day_usd: 1}\n"
    proxy = await budget_proxy(make_proxy, text, options=Options(clock=clock))
    await sdk(proxy, "spender").chat.completions.create(model="gpt-4o", messages=HI)
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(
            proxy.url + "/meter/agents/pausy/pause", json={"reason": "audit", "force": True}
        ) as r:
            assert r.status == 200 and (await r.json())["state"] == "paused"
        async with s.put(proxy.url + "/meter/agents/capped/policy",
                         json={"max_cost_per_day_usd": 0.00001}) as r:  # fmt: skip
            assert r.status == 200 and (await r.json())["policy_source"] == "api"
    await proxy.flushed()
    await proxy.server.close()

    again = await budget_proxy(make_proxy, text, options=Options(clock=clock))
    status = budget_status(again.svc.enforcer, "spender", clock())
    assert status["windows"]["day"]["spent_usd"] == "0.00008"  # rebuilt from the ledger
    with pytest.raises(openai.RateLimitError) as e:
        await sdk(again, "pausy", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HI
        )
    assert e.value.body["code"] == "agent_paused"  # type: ignore[index]
    assert "audit" in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.RateLimitError):
        await sdk(again, "capped", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HI
        )
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(again.url + "/meter/agents/pausy/resume") as r:
            assert (await r.json())["state"] == "active"
        async with s.delete(again.url + "/meter/agents/capped/policy") as r:
            assert (await r.json())["policy_source"] == "defaults"  # the config's applies again
    await sdk(again, "pausy", max_retries=0).chat.completions.create(model="gpt-4o", messages=HI)
    await sdk(again, "capped", max_retries=0).chat.completions.create(model="gpt-4o", messages=HI)


async def test_loop_guard_over_http(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    proxy = await budget_proxy(make_proxy, (
        "budgets:\n  defaults:\n    loop_guard: {max_identical_requests: 3, window_seconds: 600}\n"
    ))  # fmt: skip
    client = sdk(proxy, "looper", max_retries=0, default_headers={"X-Intent-Id": "ticket-1"})
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    assert e.value.body["code"] == "loop_detected"  # type: ignore[index]
    assert len(upstream.requests) == 3
    # A different request from the same task is not the loop.
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}]
    )


async def test_heartbeat_counts_toward_the_budget(make_proxy: ProxyFactory) -> None:
    proxy = await budget_proxy(
        make_proxy, "budgets:\n  agents:\n    reporter: {max_cost_per_day_usd: 0.05}\n"
    )
    beat = {"agent": "reporter", "intent_id": "int_abc123", "status": "processing",
            "metrics": {"cost_usd": 0.03, "llm_calls": 4, "tokens_in": 2100, "tokens_out": 850}}  # fmt: skip
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/meter/heartbeat", json=beat) as r:
            answer = await r.json()
            assert r.status == 200 and answer["allowed"] is True
            assert answer["limits"][0]["remaining_usd"] == "0.02"
        async with s.post(proxy.url + "/meter/heartbeat", json=beat) as r:
            answer = await r.json()
            assert r.status == 429 and answer["allowed"] is False
            assert answer["error"]["code"] == "max_cost_per_day_usd"
            assert r.headers["x-should-retry"] == "false"
        bad = {**beat, "metrics": {"cost_usd": "a lot"}}
        async with s.post(proxy.url + "/meter/heartbeat", json=bad) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["param"] == "metrics.cost_usd" and "must be a number" in error["message"]
        async with s.post(proxy.url + "/meter/heartbeat", json={"metrics": {"cost_usd": 1}}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "agent"
    with pytest.raises(openai.RateLimitError):
        await sdk(proxy, "reporter", max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HI
        )
    rows = await proxy.rows()
    reported = [r for r in rows if r["usage_source"] == "reported"]
    assert [(r["cost_pico"], r["llm_calls"], r["input_tokens"]) for r in reported] == [
        (30_000_000_000, 4, 2100), (30_000_000_000, 4, 2100),
    ]  # fmt: skip


async def test_admin_api_needs_the_token(make_proxy: ProxyFactory, caplog: Any) -> None:
    proxy = await budget_proxy(make_proxy, "budgets: {}\n")
    async with aiohttp.ClientSession() as s:
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-xxxxxxxxx"},
            {"Authorization": TOKEN},
        ):
            for method, path in (("GET", "/meter/agents"), ("POST", "/meter/agents/a/pause"),
                                 ("GET", "/meter/spend"), ("PUT", "/meter/agents/a/policy")):  # fmt: skip
                async with s.request(method, proxy.url + path, headers=headers, json={}) as r:
                    assert r.status == 401
                    assert (await r.json())["error"]["code"] == "invalid_admin_token"
    assert proxy.svc.enforcer.paused == {}
    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "meterproxy.admin")
    assert "wrong token" in logged and "no bearer token" in logged
    assert "wrong-token-xxxxxxxxx" not in logged and TOKEN not in logged


async def test_admin_api_is_off_without_a_token(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/meter/agents", headers=AUTH) as r:
            assert r.status == 403
            assert "admin API is off" in (await r.json())["error"]["message"]


async def test_admin_views(make_proxy: ProxyFactory, fake: Any) -> None:
    proxy = await budget_proxy(make_proxy, (
        "budgets:\n  agents:\n    research-agent: {max_cost_per_day_usd: 50, max_cost_per_intent_usd: 2}\n"
    ))  # fmt: skip
    client = sdk(proxy, default_headers={"X-Intent-Id": "int_abc123"})
    await client.chat.completions.create(model="gpt-4o", messages=HI)
    await proxy.flushed()
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(proxy.url + "/meter/agents") as r:
            agents = (await r.json())["agents"]
        assert [a["agent"] for a in agents] == ["research-agent"]
        limit = agents[0]["limits"][0]
        assert (limit["limit"], limit["limit_usd"], limit["spent_usd"], limit["remaining_usd"]) == (
            "max_cost_per_day_usd", "50", "0.00008", "49.99992",
        )  # fmt: skip
        async with s.get(proxy.url + "/meter/intents/int_abc123") as r:
            intent = await r.json()
        assert (intent["agent"], intent["spent_usd"], intent["requests"]) == (
            "research-agent",
            "0.00008",
            1,
        )
        assert intent["limits"][0]["remaining_usd"] == "1.99992"
        async with s.get(proxy.url + "/meter/intents/nope") as r:
            assert r.status == 404
        async with s.put(
            proxy.url + "/meter/agents/x/policy", json={"max_cost_per_dya_usd": 1}
        ) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["param"] == "max_cost_per_dya_usd" and "unknown key" in error["message"]
        async with s.put(proxy.url + "/meter/agents/x/policy", data=b"{oops") as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"


async def test_cli_agents_pause_resume_against_the_running_proxy(
    make_proxy: ProxyFactory, capsys: Any
) -> None:
    from proxy.cli import main

    proxy = await budget_proxy(make_proxy, "budgets:\n  defaults: {max_cost_per_day_usd: 5}\n")
    await sdk(proxy, "worker").chat.completions.create(model="gpt-4o", messages=HI)
    await proxy.flushed()
    args = ["--url", proxy.url, "--token", TOKEN]
    assert await asyncio.to_thread(main, ["pause", "worker", "--reason", "runaway", *args]) == 0
    assert "worker" in proxy.svc.enforcer.paused
    assert await asyncio.to_thread(main, ["agents", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].split()[:4] == ["worker", "paused", "today", "$0.00008"]
    assert "max_cost_per_day_usd=5 (left 4.99992)" in out[-1]
    assert await asyncio.to_thread(main, ["resume", "worker", *args]) == 0
    assert proxy.svc.enforcer.paused == {}
    assert await asyncio.to_thread(main, ["agents", "--url", proxy.url, "--token", "nope"]) == 2
    assert "HTTP 401" in capsys.readouterr().err


async def test_the_readme_example_a_loop_caught_by_the_per_intent_cap(
    make_proxy: ProxyFactory, fake: Any, caplog: Any
) -> None:
    """The product note's story: research-agent, $50/day, $2 per intent, GPT-4 in a loop."""
    upstream, _ = fake
    # A GPT-4 call of 500 prompt + 250 completion tokens: 500 * $30 + 250 * $60 per 1M = $0.03.
    upstream.script.update(prompt_tokens=500, completion_tokens=250)
    proxy = await budget_proxy(
        make_proxy,
        """
budgets:
  agents:
    research-agent:
      max_cost_per_day_usd: 50
      max_cost_per_intent_usd: 2
      action_on_breach: pause
""",
    )
    # 500 prompt tokens in gpt-4's own encoding (cl100k), as the provider would count them.
    ticket = [{"role": "user",
               "content": "Customer says the app crashes on login. " * 61 + "Please help us."}]  # fmt: skip
    client = sdk(proxy, max_retries=0, default_headers={"X-Intent-Id": "int_abc123"})
    calls = 0
    with pytest.raises(openai.RateLimitError) as e:
        while calls < 1000:  # the dedup bug: the same ticket, over and over
            await client.chat.completions.create(model="gpt-4", messages=ticket, max_tokens=250)
            calls += 1
    assert e.value.body["code"] == "max_cost_per_intent_usd"  # type: ignore[index]
    assert "intent 'int_abc123' reached max_cost_per_intent_usd" in e.value.body["message"]  # type: ignore[index]
    assert "is now paused" in e.value.body["message"]  # type: ignore[index]
    spent = proxy.svc.enforcer.store.value(intent_key("research-agent", "int_abc123"))[0]
    # Each call reserves 550 (500 + 10%) * $30 + 250 * $60 per 1M = $0.0315 and costs $0.03.
    # After 66 calls ($1.98) the 67th does not fit as asked: its cap is clamped to the 58
    # tokens the $0.02 left pays for (after its prompt), and GPT-4 stops there. Then
    # nothing fits: the 68th is refused and the agent paused, $0.0015 short of $2.
    assert calls == 67 and upstream.caps[-1] == 58
    assert spent == 66 * 30_000_000_000 + 500 * 30_000_000 + 58 * 60_000_000
    assert not [r for r in caplog.records if "more than its reservation" in r.getMessage()]
    # Paused: another task of the same agent is refused too, until someone resumes it.
    other = sdk(proxy, max_retries=0, default_headers={"X-Intent-Id": "int_def456"})
    with pytest.raises(openai.RateLimitError) as e:
        await other.chat.completions.create(model="gpt-4", messages=HI, max_tokens=10)
    assert e.value.body["code"] == "agent_paused"  # type: ignore[index]
