"""The proxy end to end: the real openai SDK -> meterproxy -> a fake provider."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Upstream
from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


def client(proxy: Proxy, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=proxy.url + "/v1",
        api_key="sk-client-key",
        max_retries=0,
        default_headers={"X-Agent-Id": "research-agent", "X-Intent-Id": "ticket-42", **headers},
    )


async def test_async_sdk_non_streaming_exact_cost(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=1000, completion_tokens=200, cached_tokens=400)
    raw = await client(proxy).chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello"
    # gpt-4o: 600 * $2.50 + 400 * $1.25 + 200 * $10.00 per 1M = 1500 + 500 + 2000
    assert raw.headers["x-meter-cost-usd"] == "0.004"
    [row] = await proxy.rows()
    assert row["id"] == raw.headers["x-meter-request-id"]
    assert (row["agent"], row["intent"], row["upstream"], row["endpoint"]) == (
        "research-agent", "ticket-42", "fake", "chat/completions",
    )  # fmt: skip
    assert (row["input_tokens"], row["cached_input_tokens"], row["output_tokens"]) == (
        1000, 400, 200,
    )  # fmt: skip
    assert row["cost_pico"] == 4_000_000_000
    assert (row["usage_source"], row["status"], row["stream"], row["model_priced"]) == (
        "provider", 200, 0, "gpt-4o",
    )  # fmt: skip
    assert row["price_version"] == proxy.svc.prices.version
    assert row["latency_ms"] > 0 and row["ttfb_ms"] is not None


async def test_sync_sdk_streaming_usage_injected_and_stripped(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=20, completion_tokens=10, model="gpt-4o-2024-08-06")
    sync = openai.OpenAI(
        base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0,
        default_headers={"X-Agent-Id": "sync-agent"},
    )  # fmt: skip

    def run() -> list[Any]:
        stream = sync.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
        return list(stream)

    chunks = await asyncio.to_thread(run)
    # The client did not ask for usage: it sees only content chunks, none carrying usage.
    assert [c.choices[0].delta.content for c in chunks] == [f"tok{i} " for i in range(5)]
    assert all(c.usage is None for c in chunks)
    # ...but the provider was asked for it.
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    [row] = await proxy.rows()
    # 20 * 2.50 + 10 * 10.00 = 150 per 1M
    assert (row["agent"], row["cost_pico"], row["usage_source"], row["stream"]) == (
        "sync-agent", 150_000_000, "provider", 1,
    )  # fmt: skip
    assert row["model_served"] == "gpt-4o-2024-08-06"


async def test_raw_stream_bytes_are_what_the_client_would_get_without_usage(
    proxy: Proxy, fake: Any
) -> None:
    _, url = fake
    body = {"model": "gpt-4o", "messages": HI, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/chat/completions", json=body) as direct:
            expected = await direct.read()
        async with session.post(proxy.url + "/v1/chat/completions", json=body) as proxied:
            got = await proxied.read()
    assert got == expected
    assert b'"usage"' not in got


async def test_stream_with_usage_requested_gets_the_usage_chunk(proxy: Proxy, fake: Any) -> None:
    stream = await client(proxy).chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 12
    [row] = await proxy.rows()
    # gpt-4o-mini: 12 * 0.15 + 5 * 0.60 = 1.8 + 3.0 = 4.8 per 1M
    assert row["cost_pico"] == 4_800_000 and row["usage_source"] == "provider"


async def test_stream_is_relayed_chunk_by_chunk(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(gate_after=1, chunks=4)
    stream = await client(proxy).chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    iterator = stream.__aiter__()
    # The upstream holds every chunk after the first until the gate opens: the client can
    # only see the first chunk now if the proxy passed it on as it arrived.
    first = await asyncio.wait_for(iterator.__anext__(), timeout=5)
    assert first.choices[0].delta.content == "tok0 "
    assert upstream.chunks_sent == 1
    upstream.gate.set()
    rest = [c async for c in iterator]
    assert len(rest) == 3


async def test_responses_api_streaming_and_not(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=2000, cached_tokens=1000, completion_tokens=300,
                           reasoning_tokens=200)  # fmt: skip
    c = client(proxy)
    response = await c.responses.create(model="gpt-5", input="Say hi")
    assert response.output_text == "Hello"
    stream = await c.responses.create(model="gpt-5", input="Say hi", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    a, b = await proxy.rows()
    # gpt-5: 1000 * 1.25 + 1000 * 0.125 + 300 * 10 = 1250 + 125 + 3000 = 4375 per 1M
    for row in (a, b):
        assert row["endpoint"] == "responses"
        assert (row["input_tokens"], row["cached_input_tokens"]) == (2000, 1000)
        assert (row["output_tokens"], row["reasoning_tokens"]) == (300, 200)
        assert row["cost_pico"] == 4_375_000_000
        assert row["usage_source"] == "provider"
    assert (a["stream"], b["stream"]) == (0, 1)
    # The Responses API always sends usage: nothing was injected.
    assert "stream_options" not in upstream.requests[-1].json()


async def test_embeddings_and_legacy_completions(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=1000)
    c = client(proxy)
    emb = await c.embeddings.create(model="text-embedding-3-small", input="the quick brown fox")
    assert emb.data[0].embedding == [0.1, 0.2, 0.3]
    completion = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert completion.choices[0].text == "Hello"
    e, comp = await proxy.rows()
    assert (e["endpoint"], e["input_tokens"], e["cost_pico"]) == ("embeddings", 1000, 20_000_000)
    # gpt-3.5-turbo-instruct: 1000 * 1.50 + 5 * 2.00 = 1510 per 1M
    assert (comp["endpoint"], comp["cost_pico"]) == ("completions", 1_510_000_000)


async def test_reasoning_and_service_tier_priced(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=1000, cached_tokens=400, completion_tokens=500,
                           reasoning_tokens=300, service_tier="flex")  # fmt: skip
    completion = await client(proxy).chat.completions.create(model="o3", messages=HI)
    assert completion.usage is not None
    [row] = await proxy.rows()
    # o3 flex: 600 * 1.00 + 400 * 0.25 + 500 * 4.00 = 600 + 100 + 2000 = 2700 per 1M
    assert (row["service_tier"], row["reasoning_tokens"], row["cost_pico"]) == (
        "flex", 300, 2_700_000_000,
    )  # fmt: skip


async def test_estimated_usage_when_the_provider_sends_none(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(send_usage=False)
    c = client(proxy)
    await c.chat.completions.create(model="gpt-4o", messages=HI)
    stream = await c.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    assert len([x async for x in stream]) == 5
    plain, streamed = await proxy.rows()
    # Prompt, cl100k: "user" 1 + "hi" 1 + 4 per message + 3 priming = 9 tokens.
    # Output: "Hello" is 1 token; "tok0 tok1 tok2 tok3 tok4 " is 11.
    assert (plain["usage_source"], plain["input_tokens"], plain["output_tokens"]) == (
        "estimated", 9, 1,
    )  # fmt: skip
    assert (streamed["usage_source"], streamed["input_tokens"], streamed["output_tokens"]) == (
        "estimated", 9, 11,
    )  # fmt: skip
    assert plain["cost_pico"] == 9 * 2_500_000 + 1 * 10_000_000
    assert streamed["cost_pico"] == 9 * 2_500_000 + 11 * 10_000_000


async def test_upstream_errors_pass_through_unchanged(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    error = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}}
    upstream.script.update(status=429, error_body=error)
    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o", "messages": HI}
        async with session.post(proxy.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 429
            assert await r.json() == error
            assert r.headers["x-meter-cost-usd"] == "0"
    [row] = await proxy.rows()
    assert (row["status"], row["cost_pico"], row["usage_source"], row["llm_calls"]) == (
        429, 0, "none", 1,
    )  # fmt: skip
    assert row["error"] == "upstream 429: Rate limit reached"


async def test_unmetered_paths_are_forwarded_and_recorded(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    models = await client(proxy).models.list()
    assert [m.id for m in models.data] == ["gpt-4o"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/v1/files?purpose=batch", data=b"x" * 100_000) as r,
    ):
        assert r.status == 200
        assert await r.json() == {"echo": "/v1/files"}
    assert upstream.requests[-1].query == "purpose=batch"
    assert upstream.requests[-1].body == b"x" * 100_000
    m, f = await proxy.rows()
    assert (m["endpoint"], m["method"], m["cost_pico"], m["llm_calls"]) == ("models", "GET", 0, 0)
    assert (f["endpoint"], f["status"]) == ("files", 200)


async def test_headers_forwarded_and_hop_by_hop_dropped(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": HI},
            headers={
                "Authorization": "Bearer sk-client-key",
                "OpenAI-Organization": "org-1",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "Keep-Alive": "timeout=5",
                "X-Agent-Id": "a",
            },
        ) as r,
    ):
        assert r.status == 200
        assert "x-meter-request-id" in r.headers
    seen = {k.lower(): v for k, v in upstream.requests[-1].headers.items()}
    assert seen["authorization"] == "Bearer sk-client-key"  # no upstream key: passes through
    assert seen["openai-organization"] == "org-1" and seen["x-custom"] == "kept"
    assert "x-hop" not in seen and "keep-alive" not in seen
    assert "x-agent-id" not in seen  # addressed to the proxy
    assert seen["accept-encoding"] == "identity"


async def test_routing_by_model_and_upstream_key(make_proxy: ProxyFactory, fake: Any,
                                                 aiohttp_server: Any) -> None:  # fmt: skip
    upstream, url = fake
    other = FakeUpstream()
    other_server = await aiohttp_server(other.app())
    other_url = str(other_server.make_url("/v1")).rstrip("/")
    proxy = await make_proxy(
        upstreams=(
            Upstream("claude", other_url, api_key="sk-ant-upstream", models=("claude-*",)),
            Upstream("fake", url, default=True),
        )
    )
    c = client(proxy)
    await c.chat.completions.create(model="claude-sonnet-4-5", messages=HI)
    await c.chat.completions.create(model="gpt-4o", messages=HI)
    assert len(other.requests) == 1 and len(upstream.requests) == 1
    assert other.requests[0].headers["Authorization"] == "Bearer sk-ant-upstream"
    assert upstream.requests[0].headers["Authorization"] == "Bearer sk-client-key"
    claude, gpt = await proxy.rows()
    assert (claude["upstream"], gpt["upstream"]) == ("claude", "fake")
    # claude-sonnet-4-5: 12 * 3 + 5 * 15 = 111 per 1M
    assert claude["cost_pico"] == 111_000_000


async def test_unknown_model_allowed_and_recorded_unpriced(proxy: Proxy, caplog: Any) -> None:
    c = client(proxy)
    raw = await c.chat.completions.with_raw_response.create(model="acme-9000", messages=HI)
    await c.chat.completions.create(model="acme-9000", messages=HI)
    assert raw.headers["x-meter-cost-usd"] == "unpriced"
    a, b = await proxy.rows()
    assert (
        a["cost_pico"] is None
        and b["cost_pico"] is None
        and a["model_priced"] is None
        and a["input_tokens"] == 12
    )
    warnings = [r for r in caplog.records if "acme-9000" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


async def test_unknown_model_blocked(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    proxy = await make_proxy(unknown_model="block")
    with pytest.raises(openai.BadRequestError) as e:
        await client(proxy).chat.completions.create(model="acme-9000", messages=HI)
    error = e.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unknown_model" and error["type"] == "meterproxy_error"
    assert "acme-9000" in error["message"] and "pricing.yaml" in error["message"]
    assert upstream.requests == []
    [row] = await proxy.rows()
    assert row["status"] == 400 and row["llm_calls"] == 0
