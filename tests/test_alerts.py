from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Any

import openai
from aiohttp import web

from proxy.app import Options
from proxy.config import AlertsConfig
from proxy.config_file import parse_config
from tests.conftest import FakeClock, Proxy, ProxyFactory

HI = [{"role": "user", "content": "hi"}]


class Receiver:
    """A real local webhook endpoint; `hold` makes it accept and never answer."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.hold = False
        self.status = 200
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        if self.hold:
            await asyncio.sleep(3600)
        return web.Response(status=self.status)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.received if kind is None or e.get("event") == kind]


async def receiver_url(aiohttp_server: Any, receiver: Receiver) -> str:
    app = web.Application()
    app.router.add_post("/hook/{secret}", receiver.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/hook/T000-secret-path"))


async def settle(proxy: Proxy) -> None:
    await proxy.flushed()
    assert proxy.svc.alerts is not None
    await asyncio.wait_for(proxy.svc.alerts.queue.join(), 10)


async def alert_proxy(make_proxy: ProxyFactory, url: str, budgets: dict[str, Any], fmt: str = "json",
                      **kw: Any) -> Proxy:  # fmt: skip
    parsed = parse_config({"budgets": budgets})
    alerts = AlertsConfig(webhooks=((url, fmt),), **kw)
    return await make_proxy(policies=parsed.policies, alerts=alerts, admin_token="a" * 20)


def ours(record: logging.LogRecord) -> bool:
    """Our own log lines (not, say, asyncio reporting a client a previous test left open)."""
    return record.name.startswith("meterproxy")


async def test_thresholds_fire_once_per_window(make_proxy: ProxyFactory, fake: Any, aiohttp_server: Any,
                                               clock: FakeClock) -> None:  # fmt: skip
    upstream, _ = fake
    upstream.script.update(prompt_tokens=1000, completion_tokens=0)  # gpt-4o: $0.0025 a call
    receiver = Receiver()
    url = await receiver_url(aiohttp_server, receiver)
    parsed = parse_config({"budgets": {"agents": {"a": {"max_cost_per_day_usd": 0.01}}}})
    proxy = await make_proxy(policies=parsed.policies, alerts=AlertsConfig(webhooks=((url, "json"),)),
                             options=Options(clock=clock))  # fmt: skip
    client = openai.AsyncOpenAI(base_url=proxy.url + "/agents/a/v1", api_key="k", max_retries=0)
    for _ in range(4):  # 25%, 50%, 75%, 100%
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    await settle(proxy)
    crossed = [e["data"]["threshold"] for e in receiver.events("budget_threshold")]
    assert crossed == [0.5, 0.8, 1.0]
    first = receiver.events("budget_threshold")[0]
    assert first["agent"] == "a" and first["data"]["limit"] == "max_cost_per_day_usd"
    assert first["message"] == "agent 'a' has used 50% of max_cost_per_day_usd: $0.005 of $0.01"
    clock.advance(86400)  # the next day: the thresholds are armed again
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    await settle(proxy)
    crossed = [e["data"]["threshold"] for e in receiver.events("budget_threshold")]
    assert crossed == [0.5, 0.8, 1.0, 0.5]


async def test_refusals_pauses_and_slack_format(make_proxy: ProxyFactory, fake: Any,
                                                aiohttp_server: Any) -> None:  # fmt: skip
    receiver = Receiver()
    url = await receiver_url(aiohttp_server, receiver)
    proxy = await alert_proxy(
        make_proxy, url,
        {"agents": {"p": {"max_cost_per_day_usd": 0.000001, "action_on_breach": "pause"},
                    "b": {"max_cost_per_day_usd": 0.000001}}},
        fmt="slack",
    )  # fmt: skip
    for agent in ("p", "b", "b", "b"):
        client = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/agents/{agent}/v1", api_key="k", max_retries=0
        )
        with contextlib.suppress(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=HI)
    await proxy.svc.enforcer.resume("p", proxy.svc.clock())
    await settle(proxy)
    texts = [e["text"] for e in receiver.received]
    assert all(set(e) == {"text"} for e in receiver.received)
    assert [t.split("meterproxy ", 1)[1].split(":", 1)[0] for t in texts] == [
        "agent_paused", "budget_refused", "budget_refused", "agent_resumed",
    ]  # fmt: skip
    # 'b' was refused three times: one alert per repeat interval, not one per call.
    assert sum("agent 'b'" in t for t in texts) == 1
    assert proxy.svc.alerts is not None and proxy.svc.alerts.suppressed == 2


async def test_a_down_webhook_does_not_slow_calls(make_proxy: ProxyFactory, fake: Any,
                                                  aiohttp_server: Any, caplog: Any) -> None:  # fmt: skip
    receiver = Receiver()
    receiver.hold = True  # accepts, never answers
    url = await receiver_url(aiohttp_server, receiver)
    proxy = await alert_proxy(make_proxy, url, {"defaults": {"max_cost_per_day_usd": 0.000001}},
                              queue_size=3, repeat_seconds=0)  # fmt: skip
    caplog.set_level(logging.WARNING, logger="meterproxy.alerts")

    async def refused(i: int) -> None:
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/agent-{i}/v1", api_key="k",
                                    max_retries=0)  # fmt: skip
        try:
            await client.chat.completions.create(model="gpt-4o", messages=HI)
        except openai.RateLimitError:
            return
        raise AssertionError("expected a refusal")

    # 40 refusals, 40 alert events, a webhook that holds every delivery: if delivery were
    # on the call path these calls would hang here.
    await asyncio.wait_for(asyncio.gather(*(refused(i) for i in range(40))), timeout=20)
    await asyncio.wait_for(receiver.arrived.wait(), 5)
    alerts = proxy.svc.alerts
    assert alerts is not None
    # Each event was delivered-and-held (1), is queued (3 at most) or was dropped.
    assert alerts.dropped + alerts.queue.qsize() + len(receiver.received) == 40
    assert len(receiver.received) == 1 and alerts.dropped >= 36  # the queue holds 3
    warnings = [r.getMessage() for r in caplog.records if "alert queue full" in r.getMessage()]
    assert len(warnings) == 1
    assert "T000-secret-path" not in " ".join(r.getMessage() for r in caplog.records)


async def test_delivery_retries_then_logs_the_failure(make_proxy: ProxyFactory, fake: Any,
                                                      aiohttp_server: Any, caplog: Any) -> None:  # fmt: skip
    receiver = Receiver()
    receiver.status = 503
    url = await receiver_url(aiohttp_server, receiver)
    proxy = await alert_proxy(make_proxy, url, {"defaults": {"max_cost_per_day_usd": 0.000001}})
    assert proxy.svc.alerts is not None
    proxy.svc.alerts.retry_delays = (0.01, 0.01)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/z/v1", api_key="k", max_retries=0)
    with contextlib.suppress(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    await settle(proxy)
    assert len(receiver.received) == 3 and proxy.svc.alerts.failed == 1
    errors = [r.getMessage() for r in caplog.records if ours(r) and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "after 3 attempts (HTTP 503)" in errors[0]
    assert "T000-secret-path" not in errors[0]


async def test_upstream_failing_repeatedly(
    make_proxy: ProxyFactory, fake: Any, aiohttp_server: Any
) -> None:
    upstream, _ = fake
    receiver = Receiver()
    url = await receiver_url(aiohttp_server, receiver)
    proxy = await alert_proxy(make_proxy, url, {})
    upstream.script.update(status=500)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    for _ in range(7):
        with contextlib.suppress(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-4o", messages=HI)
    await settle(proxy)
    failing = receiver.events("upstream_failing")
    assert len(failing) == 1 and failing[0]["data"] == {
        "upstream": "fake",
        "streak": 5,
        "status": 500,
    }
    json.dumps(failing)  # plain JSON


def test_alerts_config_parses() -> None:
    config = parse_config({"alerts": {"webhooks": [{"url": "https://hooks.slack.com/x", "format": "slack"}],
                                      "thresholds": [0.9], "queue_size": 5}})  # fmt: skip
    assert config.alerts == replace(AlertsConfig(), webhooks=(("https://hooks.slack.com/x", "slack"),),
                                    thresholds=(0.9,), queue_size=5)  # fmt: skip
