"""Runaways seen before the bill: the spend-rate breaker, runway, cost per outcome and
dry-run budgets, through the proxy with the fake upstream, the OpenAI SDK and a fake clock.

The product note's story: a loop of 4 calls at $0.03 each, every 72 seconds (50 loops an
hour, $6/hour), from an agent that usually spends $8 a day.
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.app import Options
from proxy.cli import main
from proxy.config import AlertsConfig
from proxy.config_file import parse_config
from tests.conftest import FakeClock, Proxy, ProxyFactory
from tests.test_alerts import Receiver, receiver_url, settle

HI = [{"role": "user", "content": "hi"}]
TOKEN = "runaway-admin-token-0123"
HOUR = 1_794_999_600.0  # 11:00 UTC
START = HOUR + 300  # the tests run from 11:05, inside one hour of the day
USUAL_PER_HOUR = "0.333333"  # $8 a day, spread evenly


@pytest.fixture
def ledger_url(db_url: str) -> str:
    """Every test here on SQLite and on PostgreSQL (budgets shared by replicas)."""
    return db_url


async def rate_proxy(make_proxy: ProxyFactory, clock: FakeClock, budgets: str, **kw: Any
                     ) -> Proxy:  # fmt: skip
    parsed = parse_config(yaml.safe_load(budgets))
    return await make_proxy(policies=parsed.policies, admin_token=TOKEN,
                            options=Options(clock=clock), **kw)  # fmt: skip


def dollars_a_call(upstream: Any) -> None:
    # gpt-4o: 4,000 input tokens at $2.50/M + 2,000 output at $10/M = $0.03 a call
    upstream.script.update(prompt_tokens=4000, completion_tokens=2000)


def sdk(proxy: Proxy, agent: str, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="sk-x",
                              max_retries=0, default_headers=headers)  # fmt: skip


async def call(client: openai.AsyncOpenAI, **headers: str) -> None:
    await client.chat.completions.create(model="gpt-4o", messages=HI, extra_headers=headers)


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.post(proxy.url + path, json=body) as r:
            return r.status, await r.json()


async def get(proxy: Proxy, path: str) -> tuple[int, Any]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as s:
        async with s.get(proxy.url + path) as r:
            body = await r.text()
            return r.status, json.loads(body) if "json" in r.content_type else body


async def seed_usual_week(proxy: Proxy, clock: FakeClock, agent: str) -> None:
    """$8/day for the 7 days before: this hour of each day spent $0.333333 (a heartbeat).
    Each is recorded; the first ones are answered 429 (stop): with no history yet, $0.33 at
    once is over the $0.02/min floor of the rate breaker."""
    for day in range(7, 0, -1):
        clock.now = START - day * 86400
        status, _ = await post(proxy, "/meter/heartbeat",
                               {"agent": agent, "metrics": {"cost_usd": USUAL_PER_HOUR}})  # fmt: skip
        assert status in (200, 429)
    clock.now = START
    await proxy.flushed()


LOOPER = """
budgets:
  agents:
    looper:
      max_cost_per_day_usd: 50
      max_spend_rate: {times_baseline: 4, over_minutes: 10, min_usd_per_minute: 0.02}
"""


async def test_weekend_loop_trips_the_rate_breaker_within_minutes(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock
) -> None:
    upstream, _ = fake
    proxy = await rate_proxy(make_proxy, clock, LOOPER)
    await seed_usual_week(proxy, clock, "looper")
    dollars_a_call(upstream)
    client = sdk(proxy, "looper")
    # Usual: $0.333333/h = $0.00555555/min; 4x = $0.0222222/min, above the $0.02 floor:
    # the breaker allows $0.222222 in any 10 minutes. The loop spends $0.10/min.
    admitted = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _loop in range(100):
            for i in range(4):
                clock.now = START + 72 * _loop + 18 * i
                await call(client)
                admitted += 1
    tripped_after = clock.now - START
    assert (admitted, tripped_after) == (8, 144)  # the 9th call, 2 min 24 s in
    assert proxy.svc.enforcer.spent("looper", "day", clock.now) == 240_000_000_000  # $0.24
    # A $50/day cap alone would have let this loop run for 8 h 20 min, spending $50.
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "max_spend_rate"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert error["message"] == (
        "agent 'looper' reached max_spend_rate: spending $0.02400/min over the last 10"
        " minutes, above $0.02222/min (4x its usual $0.00556/min at this hour, at least"
        " $0.0200/min); calls are refused until the rate falls (the window moves every minute)"
    )
    # Blocked until the rate falls: the first loop's minute leaves the 10-minute window
    # at 11:15 (then $0.12 remain in it).
    clock.now = START + 599
    with pytest.raises(openai.RateLimitError):
        await call(client)
    clock.now = START + 600
    await call(client)
    rows = [r for r in await proxy.rows() if r["usage_source"] != "reported"]
    assert [r["refused"] for r in rows].count(0) == 9


async def test_a_busy_hour_in_bursts_does_not_trip_it(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock
) -> None:
    upstream, _ = fake
    proxy = await rate_proxy(make_proxy, clock, LOOPER.replace("looper", "steady"))
    await seed_usual_week(proxy, clock, "steady")
    dollars_a_call(upstream)
    client = sdk(proxy, "steady")
    # 3 calls in a burst every 6 minutes for an hour: $0.90/h, 2.7x the usual rate; any
    # 10 minutes hold at most two bursts, $0.18 of the $0.222222 allowed.
    for burst in range(10):
        for i in range(3):
            clock.now = START + 360 * burst + 5 * i
            await call(client)
    assert proxy.svc.enforcer.spent("steady", "day", clock.now) == 900_000_000_000


async def test_a_fixed_rate_and_a_per_intent_rate(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock
) -> None:
    upstream, _ = fake
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, """
budgets:
  agents:
    fixed: {max_spend_rate: {usd_per_minute: 0.05, over_minutes: 5}}
    tasks: {max_spend_rate: {usd_per_minute: 0.05, over_minutes: 5, per: intent}}
""")  # fmt: skip
    dollars_a_call(upstream)
    fixed = sdk(proxy, "fixed")
    admitted = 0
    with pytest.raises(openai.RateLimitError):  # $0.25 in 5 minutes: the 10th call is over
        for i in range(20):
            clock.now = START + 18 * i
            await call(fixed)
            admitted += 1
    assert admitted == 9
    # Per intent: one intent's loop is stopped, another intent of the agent goes on.
    tasks = sdk(proxy, "tasks")
    clock.now = START
    for _ in range(9):
        await call(tasks, **{"X-Intent-Id": "loop-1"})
    with pytest.raises(openai.RateLimitError) as refused:
        await call(tasks, **{"X-Intent-Id": "loop-1"})
    assert "intent 'loop-1'" in str(refused.value)
    await call(tasks, **{"X-Intent-Id": "other"})


async def test_runway_in_the_agent_view_metrics_and_one_webhook(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock, aiohttp_server: Any
) -> None:
    upstream, _ = fake
    receiver = Receiver()
    url = await receiver_url(aiohttp_server, receiver)
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, "budgets: {agents: {a: {max_cost_per_day_usd: 1}}}",
                             alerts=AlertsConfig(webhooks=((url, "json"),)))  # fmt: skip
    dollars_a_call(upstream)
    client = sdk(proxy, "a")
    for minute in range(12):  # $0.03 a minute
        clock.now = START + 60 * minute
        await call(client)
        if minute == 5:
            await settle(proxy)
            assert receiver.events("budget_runway") == []
    await settle(proxy)
    # After the 7th call: $0.21 in the last 15 minutes = $0.014/min, $0.79 left:
    # 56 min 26 s, inside alerts.runway_seconds (1 hour). Once only for the window.
    runway = receiver.events("budget_runway")
    assert len(runway) == 1
    assert runway[0]["data"]["runway_seconds"] == 3386  # 0.79 / 0.014 * 60 = 3385.7
    assert runway[0]["data"]["rate_usd_per_minute"] == "0.014"
    assert runway[0]["message"].startswith("agent 'a' runs out in 56m of max_cost_per_day_usd")
    # Now: $0.36 spent at minute 11, $0.024/min, $0.64 left: 1600 s.
    status, view = await get(proxy, "/meter/agents/a")
    assert status == 200
    (day,) = [lim for lim in view["limits"] if lim["limit"] == "max_cost_per_day_usd"]
    assert day["rate_usd_per_minute"] == "0.024" and day["runway_seconds"] == 1600
    assert day["runway"] == "runs out in 26m" and day["runs_out_before_reset"] is True
    assert day["runs_out_at"] == proxy.svc.enforcer.calendar.iso(clock.now + 1600)
    _, metrics = await get(proxy, "/metrics")
    assert ('meterproxy_budget_runway_seconds{agent="a",limit="max_cost_per_day_usd",'
            'scope="agent"} 1600.0') in metrics  # fmt: skip
    assert ('meterproxy_spend_rate_usd_per_minute{agent="a",limit="max_cost_per_day_usd",'
            'scope="agent"} 0.024') in metrics  # fmt: skip
    # The next day: the window is new, the alert armed again.
    clock.now = START + 86400
    for minute in range(8):
        clock.now = START + 86400 + 60 * minute
        await call(client)
    await settle(proxy)
    assert len(receiver.events("budget_runway")) == 2


async def test_outcomes_from_header_heartbeat_and_api_and_the_report(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock, capsys: Any
) -> None:
    upstream, _ = fake
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, "budgets: {}")
    dollars_a_call(upstream)
    coder, writer = sdk(proxy, "coder"), sdk(proxy, "writer")
    # coder: t1 succeeds (2 calls, via the header on its last call), t2 fails (1 call,
    # via a heartbeat), t3 succeeds (3 calls, via the API); t4 stays open (1 call).
    await call(coder, **{"X-Intent-Id": "t1"})
    await call(coder, **{"X-Intent-Id": "t1", "X-Intent-Outcome": "success"})
    await call(coder, **{"X-Intent-Id": "t2"})
    for _ in range(3):
        await call(coder, **{"X-Intent-Id": "t3"})
    await call(coder, **{"X-Intent-Id": "t4"})
    await call(writer, **{"X-Intent-Id": "w1"})
    with pytest.raises(openai.BadRequestError) as bad:
        await call(writer, **{"X-Intent-Id": "w1", "X-Intent-Outcome": "sucess"})
    assert "X-Intent-Outcome" in str(bad.value) and "success, failure, abandoned" in str(bad.value)
    status, _ = await post(proxy, "/meter/heartbeat",
                           {"agent": "coder", "intent_id": "t2", "status": "failure"})  # fmt: skip
    assert status == 200
    status, closed = await post(proxy, "/meter/intents/t3/outcome", {"outcome": "success"})
    assert (status, closed["agent"], closed["outcome"]) == (200, "coder", "success")
    status, _ = await post(proxy, "/meter/intents/nope/outcome", {"outcome": "success"})
    assert status == 404
    status, _ = await post(proxy, "/meter/intents/w1/outcome", {"outcome": "done"})
    assert status == 400
    await post(proxy, "/meter/agents/writer/intents/w1/outcome", {"outcome": "abandoned"})
    await proxy.flushed()
    status, report = await get(proxy, "/meter/outcomes?by=agent")
    assert status == 200
    coder_row = report["rows"][0]
    assert coder_row == {
        "agent": "coder",
        "success_intents": 2, "success_cost_usd": "0.15",
        "failure_intents": 1, "failure_cost_usd": "0.03",
        "abandoned_intents": 0, "abandoned_cost_usd": "0",
        "open_intents": 1, "open_cost_usd": "0.03",
        "cost_usd": "0.21", "cost_per_success_usd": "0.075", "unpriced": 0,
    }  # fmt: skip
    assert report["rows"][1]["abandoned_intents"] == 1
    assert report["total"]["cost_usd"] == "0.24"
    total = sum(Decimal(r["cost_usd"]) for r in report["rows"])
    assert total == Decimal(report["total"]["cost_usd"])
    _, by_model = await get(proxy, "/meter/outcomes?by=model")
    (gpt4o,) = by_model["rows"]
    assert (gpt4o["model"], gpt4o["success_intents"], gpt4o["abandoned_intents"],
            gpt4o["cost_usd"], gpt4o["cost_per_success_usd"]) == (
        "gpt-4o", 2, 1, "0.24", "0.075")  # fmt: skip
    await proxy.flushed()
    config = proxy.config.db_url.removeprefix("sqlite:///")
    code = await asyncio.to_thread(
        main, ["report", "--db", config, "--by", "agent", "--outcomes", "--format", "json"]
    )
    assert code in (0, None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"][0]["cost_per_success_usd"] == "0.075"


async def test_without_progress_refuses_until_progress_is_reported(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock
) -> None:
    upstream, _ = fake
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, """
budgets:
  agents:
    worker: {max_cost_per_intent_without_progress_usd: 0.1}
""")  # fmt: skip
    dollars_a_call(upstream)
    client = sdk(proxy, "worker", **{"X-Intent-Id": "stuck"})
    admitted = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(10):
            await call(client)
            admitted += 1
    assert admitted == 4  # $0.09 spent, the 4th call ($0.12) would pass $0.10... admitted
    assert refused.value.body["code"] == "max_cost_per_intent_without_progress_usd"  # type: ignore[index]
    status, answer = await post(proxy, "/meter/heartbeat",
                                {"agent": "worker", "intent_id": "stuck", "status": "progress"})  # fmt: skip
    assert status == 200 and answer["allowed"] is True
    for _ in range(3):
        await call(client)  # spend counts from the progress report on
    with pytest.raises(openai.RateLimitError):
        for _ in range(3):
            await call(client)


async def test_shadow_budget_lets_every_call_through_and_counts_them(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock, caplog: Any
) -> None:
    upstream, _ = fake
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, """
budgets:
  agents:
    trial: {max_cost_per_day_usd: 0.1, action_on_breach: shadow}
""")  # fmt: skip
    dollars_a_call(upstream)
    client = sdk(proxy, "trial")
    caplog.set_level("WARNING", logger="meterproxy.budgets")
    for _ in range(6):  # $0.18: calls 5 and 6 would have been refused
        await call(client)
        clock.advance(1)  # rows in order
    rows = await proxy.rows()
    # As a block limit would: the 4th call fits when clamped to the $0.01 left; from the
    # 5th on nothing is left.
    assert [r["shadow_limit"] for r in rows] == [None] * 4 + ["max_cost_per_day_usd"] * 2
    assert [r["refused"] for r in rows] == [0] * 6
    _, metrics = await get(proxy, "/metrics")
    assert ('meterproxy_budget_shadow_refusals_total{agent="trial",'
            'limit="max_cost_per_day_usd"} 2.0') in metrics  # fmt: skip
    dry = [r.getMessage() for r in caplog.records if "dry run" in r.getMessage()]
    assert len(dry) == 2 and "would refuse" in dry[0]
    _, report = await get(proxy, "/meter/spend?by=agent")
    assert report["rows"][0]["shadowed"] == 2


@pytest.mark.parametrize("action", ["pause", "alert"])
async def test_the_breaker_pauses_or_only_alerts(
    make_proxy: ProxyFactory, fake: Any, clock: FakeClock, action: str, caplog: Any
) -> None:
    upstream, _ = fake
    clock.now = START
    proxy = await rate_proxy(make_proxy, clock, f"""
budgets:
  agents:
    a: {{max_spend_rate: {{usd_per_minute: 0.05, over_minutes: 5}}, action_on_breach: {action}}}
""")  # fmt: skip
    dollars_a_call(upstream)
    client = sdk(proxy, "a")
    caplog.set_level("WARNING", logger="meterproxy.budgets")
    outcomes = []
    for i in range(12):
        clock.now = START + 18 * i
        try:
            await call(client)
            outcomes.append("ok")
        except openai.RateLimitError as e:
            outcomes.append(e.body["code"])  # type: ignore[index]
    if action == "alert":
        assert outcomes == ["ok"] * 12
        alerts = [r.getMessage() for r in caplog.records if "call allowed" in r.getMessage()]
        assert len(alerts) == 3 and "max_spend_rate" in alerts[0]  # calls 10, 11 and 12
    else:
        assert outcomes == ["ok"] * 9 + ["max_spend_rate", "agent_paused", "agent_paused"]
        clock.now = START + 3600  # the rate fell long ago: a pause stays until resumed
        with pytest.raises(openai.RateLimitError):
            await call(client)
        assert (await post(proxy, "/meter/agents/a/resume", {}))[0] == 200
        await call(client)
