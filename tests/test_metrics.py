from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy.config_file import parse_config
from proxy.enforcer import Enforcer
from proxy.events import EventBus
from proxy.metrics import Metrics, _Histogram
from proxy.policy import PolicySet
from proxy.windows import Calendar
from tests.conftest import Proxy, ProxyFactory
from tests.records import call_record

HI = [{"role": "user", "content": "hi"}]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(proxy: Proxy, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics", headers=headers or {}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return await r.text()


async def test_counters_gauges_and_histograms(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    policies = parse_config({"budgets": {"agents": {"alpha": {"max_cost_per_day_usd": 1}},
                                         "global": {"max_cost_per_month_usd": 100}}}).policies  # fmt: skip
    proxy = await make_proxy(policies=policies)
    upstream.script.update(prompt_tokens=1000, completion_tokens=100, cached_tokens=200,
                           reasoning_tokens=40)  # fmt: skip
    alpha = openai.AsyncOpenAI(base_url=proxy.url + "/agents/alpha/v1", api_key="sk-secret-abc123",
                               max_retries=0)  # fmt: skip
    beta = openai.AsyncOpenAI(base_url=proxy.url + "/agents/beta/v1", api_key="sk-secret-abc123",
                              max_retries=0)  # fmt: skip
    for _ in range(2):
        await alpha.chat.completions.create(model="gpt-4o", messages=HI)
    await beta.chat.completions.create(model="o3", messages=HI)
    long = [{"role": "user", "content": "word " * 8000}]
    with pytest.raises(openai.RateLimitError):  # its prompt alone: 8,000 x $150/1M = $1.2 > $1
        await alpha.chat.completions.create(model="o1-pro", messages=long, max_tokens=100_000)
    await proxy.flushed()
    text = await scrape(proxy)
    m = samples(text)
    # gpt-4o: 800 * 2.50 + 200 * 1.25 + 100 * 10 = 3250 per 1M, twice.
    assert m[
        ("meterproxy_cost_usd_total", (("agent", "alpha"), ("model", "gpt-4o")))
    ] == pytest.approx(0.0065)
    # o3: 800 * 2 + 200 * 0.5 + 100 * 8 = 2500 per 1M.
    assert m[("meterproxy_cost_usd_total", (("agent", "beta"), ("model", "o3")))] == pytest.approx(
        0.0025
    )
    tokens = {kind: m[("meterproxy_tokens_total", (("agent", "alpha"), ("kind", kind), ("model", "gpt-4o")))]
              for kind in ("input", "cached_input", "output", "reasoning")}  # fmt: skip
    assert tokens == {"input": 2000, "cached_input": 400, "output": 200, "reasoning": 80}
    assert (
        m[
            (
                "meterproxy_requests_total",
                (("agent", "alpha"), ("model", "gpt-4o"), ("status", "200")),
            )
        ]
        == 2
    )
    assert (
        m[
            (
                "meterproxy_requests_total",
                (("agent", "alpha"), ("model", "o1-pro"), ("status", "429")),
            )
        ]
        == 1
    )
    assert (
        m[
            (
                "meterproxy_budget_refusals_total",
                (("agent", "alpha"), ("limit", "max_cost_per_day_usd")),
            )
        ]
        == 1
    )
    assert m[("meterproxy_budget_remaining_usd", (("agent", "alpha"), ("limit", "max_cost_per_day_usd"),
                                                  ("scope", "agent")))] == pytest.approx(1 - 0.0065)  # fmt: skip
    assert m[("meterproxy_budget_remaining_usd", (("agent", ""), ("limit", "max_cost_per_month_usd"),
                                                  ("scope", "global")))] == pytest.approx(100 - 0.009)  # fmt: skip
    assert m[("meterproxy_reservations_outstanding", ())] == 0
    assert m[("meterproxy_reserved_usd", ())] == 0
    assert m[("meterproxy_overhead_seconds_count", ())] == 3
    assert m[("meterproxy_upstream_latency_seconds_count", ())] == 3
    assert "sk-secret-abc123" not in text
    assert "intent" not in text


async def test_metrics_can_require_the_admin_token(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token="t" * 20, metrics_need_token=True)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/metrics") as r:
            assert r.status == 401
    assert "meterproxy_requests" in await scrape(proxy, {"Authorization": "Bearer " + "t" * 20})


async def test_label_values_are_capped(proxy: Proxy, monkeypatch: Any) -> None:
    import proxy.metrics as metrics

    monkeypatch.setattr(metrics, "MAX_LABEL_VALUES", 2)
    assert proxy.svc.metrics is not None
    proxy.svc.metrics._agent = metrics._Capped()
    for agent in ("a1", "a2", "a3", "a4"):
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + f"/agents/{agent}/v1/chat/completions",
                              json={"model": "gpt-4o", "messages": HI}) as r:  # fmt: skip
                assert r.status == 200
    await proxy.flushed()
    m = samples(await scrape(proxy))
    agents = {dict(k[1]).get("agent") for k in m if k[0] == "meterproxy_requests_total"}
    assert agents == {"a1", "a2", "other"}


async def test_the_grafana_dashboard_uses_only_metrics_we_export(proxy: Proxy) -> None:
    import json
    import re

    from tests.conftest import ROOT

    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}
        ) as r:
            assert r.status == 200
    await proxy.flushed()
    names = set()
    for family in text_string_to_metric_families(await scrape(proxy)):
        names |= {s.name for s in family.samples} | {family.name}
        if family.type == "counter":  # a labelled counter has no samples before its first use
            names.add(family.name + "_total")
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(meterproxy_[a-z_]+)", e)}
    assert len(exprs) >= 10 and used
    assert used - names == set()


def test_a_histogram_kept_as_plain_numbers_is_exposed_as_prometheus_client_exposes_it() -> None:
    bounds = (0.0001, 0.00025, 0.5, 1, 2.5, 300)
    reference, ours = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("h", "d", buckets=bounds, registry=reference)
    mine = _Histogram(bounds)
    for value in (0.0001, 0.0002, 0.7, 1, 3, 1000, 0.00005, 0.0):  # on, between, past bounds
        theirs.observe(value)
        mine.observe(value)

    class One(Collector):
        def collect(self) -> Any:
            yield mine.family("h", "d")

    ours.register(One())

    def samples(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith(("h_bucket", "h_count", "h_sum"))]  # fmt: skip

    assert samples(ours) == samples(reference)
    assert 'h_bucket{le="1.0"} 6.0' in samples(ours)  # 1 counts in le=1


def test_spend_is_summed_in_pico_usd_and_turned_into_usd_once() -> None:
    enforcer = Enforcer(Calendar("UTC"), PolicySet(), EventBus(), None)
    metrics = Metrics(lambda: enforcer, lambda: 0.0)
    for i in range(3):  # $0.10 each: as floats, 0.1 + 0.1 + 0.1 is 0.30000000000000004
        metrics.call_ended(call_record(f"req_{i}", 0.0, cost_pico=10**11), 0.5)
    [cost] = [f for f in metrics.calls.collect() if f.name == "meterproxy_cost_usd"]
    assert [(s.labels, s.value) for s in cost.samples] == [({"agent": "a", "model": "gpt-4o"}, 0.3)]
