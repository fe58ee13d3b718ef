"""Native provider APIs through the proxy: Anthropic Messages with the real `anthropic` SDK,
Azure OpenAI with `openai.AzureOpenAI`, Gemini's generateContent. Costs by hand from the
providers' published prices (pricing.yaml)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml

from proxy.config import Config, Upstream
from proxy.config_file import parse_config
from tests.conftest import Proxy, ProxyFactory
from tests.fake_providers import FakeAnthropic, FakeGemini
from tests.fake_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def claude(aiohttp_server: Any) -> AsyncIterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app())
    yield fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gemini(aiohttp_server: Any) -> AsyncIterator[tuple[FakeGemini, str]]:
    fake = FakeGemini()
    server = await aiohttp_server(fake.app())
    yield fake, str(server.make_url("")).rstrip("/")


async def provider_proxy(make_proxy: ProxyFactory, fake: Any, *extra: Upstream,
                         budgets: str = "", **kw: Any) -> Proxy:  # fmt: skip
    _, openai_url = fake
    upstreams = (Upstream("fake", openai_url, default=True), *extra)
    if budgets:
        kw["policies"] = parse_config(yaml.safe_load(budgets)).policies
    return await make_proxy(upstreams=upstreams, **kw)


def claude_client(proxy: Proxy, agent: str = "coder", **kw: Any) -> anthropic.AsyncAnthropic:
    # What ANTHROPIC_BASE_URL=http://127.0.0.1:8787/agents/coder does.
    return anthropic.AsyncAnthropic(base_url=f"{proxy.url}/agents/{agent}", api_key="sk-ant-x",
                                    max_retries=kw.pop("max_retries", 2), **kw)  # fmt: skip


# -- Anthropic ---------------------------------------------------------------------------


async def test_anthropic_messages_priced_with_cache_writes_and_reads(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    upstream.script.update(input_tokens=100, cache_creation_input_tokens=2000, cache_1h=500,
                           cache_read_input_tokens=3000, output_tokens=400)  # fmt: skip
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", url, provider="anthropic"))
    message = await claude_client(proxy).messages.create(
        model="claude-sonnet-4-5", max_tokens=1024, messages=HI
    )
    assert message.usage.output_tokens == 400
    seen = upstream.requests[0]
    # The client's key and API version pass through (this SDK sends the key as a bearer).
    assert "sk-ant-x" in (seen.headers.get("x-api-key") or seen.headers["Authorization"])
    assert "anthropic-version" in seen.headers
    (row,) = await proxy.rows()
    # claude-sonnet-4-5 per 1M: 100 x $3 + 1,500 x $3.75 (5-minute writes) + 500 x $6
    # (1-hour writes) + 3,000 x $0.30 (reads) + 400 x $15 = $0.015825
    assert row["cost_pico"] == 15_825_000_000
    assert (row["input_tokens"], row["cached_input_tokens"], row["cache_write_tokens"]) == (
        5100, 3000, 2000,
    )  # fmt: skip
    assert (row["provider"], row["upstream"], row["endpoint"], row["agent"]) == (
        "anthropic", "claude", "messages", "coder",
    )  # fmt: skip


async def test_anthropic_sync_client_and_stream_relayed_byte_for_byte(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    upstream.script.update(input_tokens=50, output_tokens=30)
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", url, provider="anthropic"))

    def sync_call() -> int:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-x")
        return client.messages.create(model="claude-haiku-4-5", max_tokens=100,
                                      messages=HI).usage.output_tokens  # fmt: skip

    assert await asyncio.to_thread(sync_call) == 30
    async with claude_client(proxy).messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=HI
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello 0 Hello 1 Hello 2 Hello 3 " and final.usage.output_tokens == 30
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/messages", json=body) as r:
            direct = await r.read()
        async with s.post(proxy.url + "/v1/messages", json=body,
                          headers={"anthropic-version": "2023-06-01"}) as r:  # fmt: skip
            proxied = await r.read()
    assert proxied == direct  # the stream as the provider sent it
    rows = await proxy.rows()
    # claude-haiku-4-5: 50 x $1 + 30 x $5 per 1M, each time; the stream's usage is the last
    # message_delta's (cumulative), not a sum with message_start's provisional count.
    assert [r["cost_pico"] for r in rows] == [200_000_000] * 3
    assert [r["stream"] for r in rows] == [0, 1, 1]


async def test_anthropic_budget_refusal_is_raised_once_in_anthropics_shape(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    proxy = await provider_proxy(
        make_proxy, fake, Upstream("claude", url, provider="anthropic"),
        budgets="budgets:\n  agents:\n    coder: {max_cost_per_day_usd: 0.00001}\n",
    )  # fmt: skip
    with pytest.raises(anthropic.RateLimitError) as e:  # the SDK retries a plain 429 twice
        await claude_client(proxy).messages.create(model="claude-opus-4-1", max_tokens=5000,
                                                   messages=[{"role": "user", "content": "x" * 400}])  # fmt: skip
    assert e.value.body["type"] == "error"  # type: ignore[index]
    assert e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "max_cost_per_day_usd" in e.value.body["error"]["message"]  # type: ignore[index]
    assert e.value.response.headers["x-should-retry"] == "false"
    assert int(e.value.response.headers["retry-after"]) > 0
    assert upstream.requests == [] and len(await proxy.rows()) == 1  # asked once


async def test_anthropic_free_endpoints_pass_through_at_zero(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", url, provider="anthropic"))
    client = claude_client(proxy)
    counted = await client.messages.count_tokens(model="claude-sonnet-4-5", messages=HI)
    models = await client.models.list()
    assert counted.input_tokens == 42 and models.data[0].id == "claude-sonnet-4-5"
    assert [r.path for r in upstream.requests] == ["/v1/messages/count_tokens", "/v1/models"]
    rows = await proxy.rows()
    assert [(r["endpoint"], r["cost_pico"], r["provider"]) for r in rows] == [
        ("messages/count_tokens", 0, "anthropic"), ("models", 0, "anthropic"),
    ]  # fmt: skip


async def test_200_concurrent_anthropic_calls_hold_a_small_budget(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    upstream.script.update(input_tokens=10, output_tokens=200, delay=0.05)
    proxy = await provider_proxy(
        make_proxy, fake, Upstream("claude", url, provider="anthropic"),
        budgets="budgets:\n  agents:\n    coder: {max_cost_per_day_usd: 0.02}\n",
    )  # fmt: skip
    client = claude_client(proxy, max_retries=0)

    async def one() -> str:
        try:
            await client.messages.create(model="claude-sonnet-4-5", max_tokens=200, messages=HI)
            return "ok"
        except anthropic.RateLimitError:
            return "refused"

    outcomes = await asyncio.gather(*(one() for _ in range(200)))
    spent = sum(b.input * 3_000_000 + b.output * 15_000_000 for b in upstream.bills)
    assert spent <= 20_000_000_000  # $0.02
    assert outcomes.count("ok") >= 5 and outcomes.count("refused") >= 150
    assert sum(r["cost_pico"] for r in await proxy.rows()) == spent


async def test_an_anthropic_stream_cut_by_the_budget_raises_in_the_sdk(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    upstream, url = claude
    upstream.script.update(input_tokens=5, output_tokens=2000, chunks=2000, text="w",
                           chunk_delay=0.001)  # fmt: skip
    proxy = await provider_proxy(
        make_proxy, fake, Upstream("claude", url, provider="anthropic"), reserve_output_tokens=50,
        budgets="budgets:\n  agents:\n    coder: {max_cost_per_day_usd: 0.002}\n",
    )  # fmt: skip
    with pytest.raises(anthropic.APIStatusError) as e:
        async with claude_client(proxy, max_retries=0).messages.stream(
            model="claude-sonnet-4-5", max_tokens=4000, messages=HI
        ) as stream:
            async for _ in stream.text_stream:
                pass
    assert "max_cost_per_day_usd" in str(e.value) and "The stream was cut" in str(e.value)
    (row,) = await proxy.rows()
    assert row["error"].startswith("stream cut by the budget")
    assert row["cost_pico"] <= 2_000_000_000


# -- Azure OpenAI --------------------------------------------------------------------------


async def test_azure_openai_deployments_priced_by_the_map_or_the_answer(
    make_proxy: ProxyFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    base = url.removesuffix("/v1")
    upstream.script.update(model="gpt-4o-2024-11-20")
    proxy = await provider_proxy(
        make_proxy, fake,
        Upstream("azure", base, provider="azure", api_key="azure-key-from-config",
                 deployments=(("prod-chat", "gpt-4o-mini"),)),
    )  # fmt: skip
    client = openai.AsyncAzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21",
                                     api_key="client-azure-key", max_retries=0)  # fmt: skip
    await client.chat.completions.create(model="prod-chat", messages=HI)  # by the map
    await client.chat.completions.create(model="team-x", messages=HI)  # by the answer
    stream = await client.chat.completions.create(model="prod-chat", messages=HI, stream=True)
    _ = [c async for c in stream]
    first = upstream.requests[0]
    assert first.path == "/openai/deployments/prod-chat/chat/completions"
    assert first.query == "api-version=2024-10-21"
    assert first.headers["api-key"] == "azure-key-from-config"  # the client's never leaves
    rows = await proxy.rows()
    assert [(r["model_requested"], r["model_priced"], r["cost_pico"]) for r in rows] == [
        ("prod-chat", "gpt-4o-mini", 12 * 150_000 + 5 * 600_000),  # 12 in, 5 out per 1M
        ("team-x", "gpt-4o", 12 * 2_500_000 + 5 * 10_000_000),
        ("prod-chat", "gpt-4o-mini", 12 * 150_000 + 5 * 600_000),
    ]  # fmt: skip
    assert {r["provider"] for r in rows} == {"azure"}


async def test_azure_v1_paths_and_refusals_the_sdk_understands(
    make_proxy: ProxyFactory, fake: tuple[FakeUpstream, str]
) -> None:
    upstream, url = fake
    proxy = await provider_proxy(
        make_proxy, fake, Upstream("azure", url.removesuffix("/v1"), provider="azure"),
        budgets="budgets:\n  agents:\n    tight: {max_cost_per_day_usd: 0.00001}\n",
    )  # fmt: skip
    client = openai.AsyncAzureOpenAI(azure_endpoint=proxy.url, api_version="2024-10-21",
                                     api_key="k", max_retries=2,
                                     default_headers={"X-Agent-Id": "tight"})  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=[{
            "role": "user", "content": "word " * 100}])  # fmt: skip
    assert len(await proxy.rows()) == 1  # raised once: no retries
    v1 = openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key="k", max_retries=0)
    await v1.responses.create(model="gpt-4o", input="hi", max_output_tokens=2)
    assert upstream.requests[-1].path == "/openai/v1/responses"
    # A path Azure's SDK calls that the proxy does not serve is an error it can read.
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/openai/deployments") as r:
            assert r.status == 200  # passed through to the upstream


# -- Gemini -------------------------------------------------------------------------------


async def test_gemini_generate_content_json_and_sse(
    make_proxy: ProxyFactory, fake: Any, gemini: tuple[FakeGemini, str]
) -> None:
    upstream, url = gemini
    upstream.script.update(prompt=1000, cached=400, candidates=200, thoughts=300)
    proxy = await provider_proxy(make_proxy, fake, Upstream("gem", url, provider="gemini"))
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1beta/models/gemini-2.5-flash:generateContent",
                          json=body, headers={"x-goog-api-key": "g-key"}) as r:  # fmt: skip
            assert r.status == 200
            assert (await r.json())["usageMetadata"]["thoughtsTokenCount"] == 300
        async with s.post(url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          json=body) as r:  # fmt: skip
            direct = await r.read()
        async with s.post(proxy.url + "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          json=body) as r:  # fmt: skip
            proxied = await r.read()
    assert proxied == direct
    assert upstream.requests[0].headers["x-goog-api-key"] == "g-key"
    assert upstream.requests[-1].query == "alt=sse"
    rows = await proxy.rows()
    # gemini-2.5-flash per 1M: 600 x $0.30 + 400 cached x $0.03 + (200 + 300 thinking) x $2.50
    assert [r["cost_pico"] for r in rows] == [1_442_000_000] * 2
    assert [(r["reasoning_tokens"], r["endpoint"], r["provider"]) for r in rows] == [
        (300, "generateContent", "gemini"), (300, "streamGenerateContent", "gemini"),
    ]  # fmt: skip


def test_gemini_usage_from_recorded_shapes() -> None:
    from proxy.shapes.gemini import GenerateReader, facts_from_body
    from proxy.sse import StreamMeter

    body = json.loads(GEMINI_RESPONSE)
    facts = facts_from_body(body)
    assert facts.usage is not None
    u = facts.usage
    assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (
        1216, 1024, 1178, 964,
    )  # fmt: skip
    assert facts.model == "gemini-2.5-pro"
    meter = StreamMeter(GenerateReader())
    out = b"".join(meter.feed(GEMINI_SSE[i : i + 50]) for i in range(0, len(GEMINI_SSE), 50))
    assert out + meter.finish() == GEMINI_SSE  # relayed as it came
    assert meter.final_seen and meter.facts.usage is not None
    assert (meter.facts.usage.output_tokens, meter.facts.usage.reasoning_tokens) == (49, 40)


# Shaped like Gemini API answers (usageMetadata of a 2.5 Pro call that used a cache and
# thought; a streamed answer whose last chunk carries the final usage).
GEMINI_RESPONSE = """{"candidates": [{"content": {"parts": [{"text": "Here is the plan."}],
 "role": "model"}, "finishReason": "STOP", "index": 0}], "usageMetadata": {
 "promptTokenCount": 1208, "candidatesTokenCount": 214, "totalTokenCount": 2394,
 "cachedContentTokenCount": 1024, "toolUsePromptTokenCount": 8, "thoughtsTokenCount": 964,
 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 1208}]},
 "modelVersion": "gemini-2.5-pro", "responseId": "abc123"}"""
GEMINI_SSE = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}],"role": "model"},'
    b'"index": 0}],"usageMetadata": {"promptTokenCount": 7,"totalTokenCount": 7},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "r1"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": "lo"}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 7,'
    b'"candidatesTokenCount": 9,"totalTokenCount": 56,"thoughtsTokenCount": 40},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "r1"}\r\n\r\n'
)


async def test_paths_only_one_provider_serves_go_to_it(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str],
    gemini: tuple[FakeGemini, str],
) -> None:  # fmt: skip
    openai_fake, _ = fake
    anthropic_fake, claude_url = claude
    gemini_fake, gemini_url = gemini
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", claude_url, provider="anthropic"),
                                 Upstream("gem", gemini_url, provider="gemini"))  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for path, headers in (
            ("/v1/models", {}),
            ("/v1/models", {"anthropic-version": "2023-06-01"}),
        ):
            async with s.get(proxy.url + path, headers=headers) as r:
                assert r.status == 200
        async with s.post(proxy.url + "/v1/models/gemini-2.0-flash:generateContent",
                          json={"contents": []}) as r:  # fmt: skip
            assert r.status == 200
    assert [r.path for r in openai_fake.requests] == ["/v1/models"]
    assert [r.path for r in anthropic_fake.requests] == ["/v1/models"]
    assert [r.path for r in gemini_fake.requests] == ["/v1/models/gemini-2.0-flash:generateContent"]


def test_provider_config_is_checked() -> None:
    from proxy.schema import FieldError

    with pytest.raises(FieldError, match="provider anthropic, give the root URL"):
        parse_config({"upstreams": [{"name": "a", "base_url": "https://api.anthropic.com/v1",
                                     "provider": "anthropic"}]})  # fmt: skip
    with pytest.raises(FieldError, match="only Azure upstreams"):
        parse_config(
            {"upstreams": [{"name": "a", "base_url": "https://x", "deployments": {"a": "b"}}]}
        )
    config = Config()
    anthropic_default = config.upstream_for("claude-sonnet-4-5", "anthropic")
    assert (
        anthropic_default is not None and anthropic_default.base_url == "https://api.anthropic.com"
    )
    assert config.upstream_for("x", "azure") is None  # Azure needs its resource's URL


async def test_reports_by_provider(
    make_proxy: ProxyFactory, fake: Any, claude: tuple[FakeAnthropic, str]
) -> None:
    from proxy.reports import spend_report

    _, url = claude
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", url, provider="anthropic"))
    await claude_client(proxy).messages.create(model="claude-haiku-4-5", max_tokens=50, messages=HI)
    await openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k").chat.completions.create(
        model="gpt-4o", messages=HI)  # fmt: skip
    await proxy.flushed()
    report = await spend_report(proxy.svc.storage, proxy.svc.enforcer.calendar, by="provider")
    # claude-haiku-4-5: 20 x $1 + 10 x $5 per 1M; gpt-4o: 12 x $2.50 + 5 x $10
    assert {r.key: r.totals.cost_pico for r in report.rows} == {
        "anthropic": 70_000_000, "openai": 80_000_000,
    }  # fmt: skip
    assert report.total.cost_pico == 150_000_000


async def test_anthropic_metadata_user_id_is_the_end_user(
    make_proxy: ProxyFactory, fake: Any, claude: Any
) -> None:
    _, url = claude
    proxy = await provider_proxy(make_proxy, fake, Upstream("claude", url, provider="anthropic"))
    await claude_client(proxy).messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=HI,
                                 metadata={"user_id": "cust-42"})  # fmt: skip
    await proxy.flushed()
    (row,) = await proxy.rows()
    assert (row["agent"], row["end_user"], row["provider"]) == ("coder", "cust-42", "anthropic")
