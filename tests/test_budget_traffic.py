"""Budgets on the calls agents really make: uncapped, streamed, chained, with images, in
the background, abandoned by their client, and to endpoints that bill in other ways.

The fake provider bills as a real one does (`FakeUpstream.bills`): what it counted as
input and what it generated, a stream cut mid-way included. The promise under test: once
a budget is hit nothing more is spent, and until then calls go through.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.config_file import parse_config
from tests.conftest import Proxy, ProxyFactory
from tests.fake_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]  # 9 tokens, as tiktoken counts it
USD = 10**12
PER_M = 10**6  # pico-USD per token, per $1 per 1M tokens


def policies(text: str) -> Any:
    return parse_config(yaml.safe_load(text)).policies


def billed(upstream: FakeUpstream, input_per_m: float, output_per_m: float) -> int:
    """What the fake provider charged, in pico-USD, at one model's prices."""
    return sum(int(b.input * input_per_m * PER_M) + int(b.output * output_per_m * PER_M)
               for b in upstream.bills)  # fmt: skip


def sdk(proxy: Proxy, agent: str = "agent") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="sk-x",
                              max_retries=0)  # fmt: skip


async def test_uncapped_calls_run_until_the_budget_is_spent(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    """$5/day on gpt-5.5 (128,000 output tokens at most, $30/1M: $3.84 each, and $9.60 at
    the priority tier), no max_tokens, 300 output tokens a call, JSON and streaming in
    turn. Before: refused at $0 spent. Now: admitted until the budget is spent."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9, completion_tokens=300)
    proxy = await make_proxy(policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 5}\n"))  # fmt: skip
    client = sdk(proxy)
    calls = 0
    with pytest.raises(openai.RateLimitError) as e:
        while calls < 2000:
            if calls % 2:
                stream = await client.chat.completions.create(model="gpt-5.5", messages=HI,
                                                              stream=True)  # fmt: skip
                _ = [c async for c in stream]
            else:
                await client.chat.completions.create(model="gpt-5.5", messages=HI)
            calls += 1
    assert e.value.body["code"] == "max_cost_per_day_usd"  # type: ignore[index]
    spent = billed(upstream, 5, 30)
    limit = 5 * USD
    # gpt-5.5 hides its reasoning from a stream: every call's cap bounds it, so the
    # provider never bills past the limit at all.
    assert 0.9 * limit <= spent <= limit
    rows = await proxy.rows()
    assert sum(r["cost_pico"] for r in rows) == spent  # the ledger is the provider's bill
    assert calls > 500  # each call costs $0.009045: the budget paid for all of them


async def test_forty_uncapped_streams_are_cut_at_the_budget(
    make_proxy: ProxyFactory, fake: Any, db_url: str
) -> None:
    """40 streams at once, 400 tokens each, against $0.05: $0.16 of demand. Each reserves
    its prompt and 100 tokens and is extended 100 tokens at a time while the budget pays;
    past it, streams are cut with an error the SDK raises, naming the budget."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9, chunks=400, completion_tokens=400,
                           chunk_text=" the", token_chunks=True, chunk_delay=0.005)  # fmt: skip
    proxy = await make_proxy(reserve_output_tokens=100, db_url=db_url, policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.05}\n"))  # fmt: skip
    client = sdk(proxy)

    async def one() -> str:
        try:
            stream = await client.chat.completions.create(model="gpt-4o", messages=HI,
                                                          stream=True)  # fmt: skip
            async for _ in stream:
                pass
            return "completed"
        except openai.RateLimitError:
            return "refused"
        except openai.APIError as e:
            assert "max_cost_per_day_usd" in e.message and "The stream was cut" in e.message
            return "cut"

    outcomes = await asyncio.gather(*(one() for _ in range(40)))
    limit = USD // 20
    spent = billed(upstream, 2.5, 10)
    assert outcomes.count("cut") >= 20 and outcomes.count("refused") == 0
    assert spent <= limit * 1.01, (spent, outcomes)
    assert spent >= limit * 0.9  # the budget was used, not refused early
    rows = await proxy.rows()
    completed = [r for r in rows if r["error"] is None]
    assert len(completed) == outcomes.count("completed")
    for row in completed:  # a completed stream's row is the provider's own figure
        assert (row["usage_source"], row["cost_pico"]) == (
            "provider",
            9 * 2_500_000 + 400 * 10_000_000,
        )
    cut = [r for r in rows if r["error"] is not None]
    assert all(r["error"].startswith("stream cut by the budget: agent 'agent' reached")
               for r in cut)  # fmt: skip
    # What a cut stream's rows miss of the provider's bill is what the upstream generated
    # after the hang-up, and what was still in the socket then: what arrived while its
    # budget was being asked is counted (left unread, it was 30-60 tokens a stream here,
    # and the budget paid them twice over). On an idle machine that is at most a token a
    # stream; in the full suite on 2 busy cores the proxy reads later and 62 tokens were
    # in flight for 39 cut streams. The bound keeps six times the margin to the old fault.
    unseen = sum(b.output for b in upstream.bills) - sum(r["output_tokens"] for r in rows)
    assert 0 <= unseen <= 5 * len(cut), (unseen, len(cut))
    assert proxy.svc.enforcer.outstanding == 0


async def test_a_chain_is_reserved_for_what_it_carries(make_proxy: ProxyFactory, fake: Any) -> None:
    """60 follow-ups of a 10,000-token Responses chain (`previous_response_id`) at once
    against $0.10: each is billed for the whole chain as input. Before: 8.7x the limit."""
    upstream, _ = fake
    proxy = await make_proxy(policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.1}\n"))  # fmt: skip
    client = sdk(proxy)
    upstream.script.update(prompt_tokens=9000, completion_tokens=1000)
    first = await client.responses.create(model="gpt-4o", input="start", max_output_tokens=1000)
    upstream.script.update(prompt_tokens=10_009, completion_tokens=50)

    async def follow_up() -> str:
        try:
            await client.responses.create(model="gpt-4o", input="hi", max_output_tokens=50,
                                          previous_response_id=first.id)  # fmt: skip
            return "ok"
        except openai.RateLimitError:
            return "refused"

    outcomes = await asyncio.gather(*(follow_up() for _ in range(60)))
    spent = billed(upstream, 2.5, 10)
    assert spent <= USD // 10, spent
    # The first call cost $0.0325, each follow-up costs $0.0255225: two fit in what is left.
    assert outcomes.count("ok") == 2
    rows = await proxy.rows()
    reserved = {r["reserved_pico"] for r in rows[1:] if not r["refused"]}
    # 10,000 chain tokens + 2 of "hi" (with the margin) at $2.50/1M, 50 output at $10/1M
    assert reserved == {(10_000 + 2) * 2_500_000 + 50 * 10_000_000}


async def test_an_unseen_chain_is_reserved_at_the_context_window_or_refused(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    proxy = await make_proxy(policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.3}\n"))  # fmt: skip
    # gpt-4o's whole context, 128,000 tokens at $2.50/1M, is $0.32 before any output.
    with pytest.raises(openai.RateLimitError) as e:
        await sdk(proxy).responses.create(model="gpt-4o", input="hi", max_output_tokens=20000,
                                          previous_response_id="resp_elsewhere")  # fmt: skip
    assert "this call could cost up to $0.5200" in e.value.body["message"]  # type: ignore[index]
    strict = await make_proxy(unknown_chain="block", policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 5}\n"))  # fmt: skip
    with pytest.raises(openai.PermissionDeniedError) as e:
        await sdk(strict).responses.create(model="gpt-4o", input="hi",
                                           previous_response_id="resp_elsewhere")  # fmt: skip
    assert e.value.body["code"] == "unknown_chain"  # type: ignore[index]
    assert "budgets.unknown_chain" in e.value.body["message"]  # type: ignore[index]


def _png(width: int, height: int) -> str:
    """A data URL whose header says the size (the rest is not an image: it need not be)."""
    head = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", width, height)
    )
    return "data:image/png;base64," + base64.b64encode(head + b"\x00" * 64).decode()


async def test_images_are_reserved_by_the_models_rule(make_proxy: ProxyFactory, fake: Any) -> None:
    """gpt-4o-mini bills 2,833 + 5,667 per 512-px tile: a 1000x2600 image is 8 tiles,
    48,169 tokens. Before: reserved at 1,105 and 100 of 100 calls admitted (14.5x)."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=48_169 + 9, completion_tokens=20)
    proxy = await make_proxy(policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.05}\n"))  # fmt: skip
    message = [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": _png(1000, 2600), "detail": "high"}}]}]  # fmt: skip

    async def one() -> str:
        try:
            await sdk(proxy).chat.completions.create(model="gpt-4o-mini", messages=message,
                                                     max_tokens=20)  # fmt: skip
            return "ok"
        except openai.RateLimitError:
            return "refused"

    outcomes = await asyncio.gather(*(one() for _ in range(100)))
    spent = billed(upstream, 0.15, 0.6)
    assert spent <= USD // 20 and outcomes.count("ok") == 6  # 6 x $0.0072 fit in $0.05
    reserved = [r["reserved_pico"] for r in await proxy.rows() if not r["refused"]]
    assert min(reserved) >= 48_169 * 150_000  # every one held at least the image's tokens


async def test_a_stream_is_metered_as_it_flows_unless_its_whole_cap_is_reserved(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    """Reserved: the prompt and 100 tokens. Capped at 1,000, a stream can outgrow that, so
    it is counted as it flows and cut at the budget ($0.002: 197 output tokens). Capped at
    50 it cannot: it runs to its end, billed as the provider counts."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9, chunks=400, completion_tokens=400,
                           chunk_text=" the", token_chunks=True, chunk_delay=0.002)  # fmt: skip
    proxy = await make_proxy(reserve_output_tokens=100, policies=policies(
        "budgets:\n  defaults: {max_cost_per_day_usd: 0.002}\n"))  # fmt: skip
    client = sdk(proxy)
    with pytest.raises(openai.APIError, match="The stream was cut"):
        stream = await client.chat.completions.create(model="gpt-4o", messages=HI,
                                                      stream=True, max_tokens=1000)  # fmt: skip
        async for _ in stream:
            pass
    [cut] = await proxy.rows()
    assert cut["error"].startswith("stream cut by the budget")
    assert cut["cost_pico"] <= 2 * USD // 1000
    assert 150 <= cut["output_tokens"] <= 197, cut["output_tokens"]

    upstream.script.update(chunks=50, completion_tokens=50)
    stream = await sdk(proxy, "other").chat.completions.create(model="gpt-4o", messages=HI, stream=True,
                                                  max_tokens=50)  # fmt: skip
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == " the" * 50
    whole = (await proxy.rows())[-1]
    assert (whole["error"], whole["usage_source"], whole["output_tokens"]) == (None, "provider", 50)
    assert whole["cost_pico"] == 9 * 2_500_000 + 50 * 10_000_000
    assert proxy.svc.enforcer.outstanding == 0


async def test_background_responses_keep_their_reservation_until_they_finish(
    make_proxy: ProxyFactory, fake: Any, db_url: str
) -> None:
    """`background: true` answers `queued`, with no usage. Before: recorded at ~$0 and its
    reservation released ($4.00 spent against $0.50)."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=2, completion_tokens=1000, background_after=0.3)
    proxy = await make_proxy(db_url=db_url, policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.05}\n"))  # fmt: skip
    client = sdk(proxy)

    async def one() -> str | None:
        try:
            r = await client.responses.create(model="gpt-4o", input="hi", background=True,
                                              max_output_tokens=1000)  # fmt: skip
            return r.id
        except openai.RateLimitError:
            return None

    ids = await asyncio.gather(*(one() for _ in range(20)))
    admitted = [i for i in ids if i is not None]
    # Each reserves 2 + 1,000 tokens ($0.010005): four fit, a fifth capped at the 997 output
    # tokens that are left; the rest are refused, though no usage has come back yet. (With
    # shared budgets the fifth's cap is sized on the replica's view, which arrives together
    # with the others: it is refused instead, never over.)
    assert upstream.caps == [1000] * 4 + ([] if proxy.svc.storage.shared else [997])
    assert proxy.svc.enforcer.outstanding == len(admitted) == len(upstream.caps)
    # The client asks for two of them; the proxy retrieves the other two itself.
    await asyncio.sleep(0.35)
    for rid in admitted[:2]:
        done = await client.responses.retrieve(rid)
        assert done.status == "completed"
    for _ in range(100):
        if proxy.svc.enforcer.outstanding == 0:
            break
        await asyncio.sleep(0.1)
    assert proxy.svc.enforcer.outstanding == 0
    rows = await proxy.rows()
    if proxy.svc.storage.shared:  # the database holds no reservation either
        await asyncio.sleep(0.2)
        assert await proxy.svc.storage.fetch("SELECT COUNT(*) FROM reservations") == [(0,)]
    completions = [r for r in rows if r["id"].startswith("bg_")]
    assert sorted(r["response_id"] for r in completions) == sorted(admitted)
    assert {r["usage_source"] for r in completions} == {"provider"}
    created = [r for r in rows if r["endpoint"] == "responses" and not r["refused"]]
    assert {r["usage_source"] for r in created} == {"pending"}
    spent = sum(r["cost_pico"] or 0 for r in rows)
    assert spent == billed(upstream, 2.5, 10) == sum(2 * 2_500_000 + cap * 10_000_000
                                                     for cap in upstream.caps)  # fmt: skip
    assert spent <= USD // 20
    # A second retrieval of a finished response records nothing more.
    await client.responses.retrieve(admitted[0])
    assert len([r for r in await proxy.rows() if r["id"].startswith("bg_")]) == len(admitted)


async def test_a_client_that_hangs_up_does_not_hide_the_bill(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    """The provider finishes (and bills) a non-streamed call whose client left. Before:
    the ledger said $0.002 where $2.80 was billed."""
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9, completion_tokens=70_000, delay=0.3)
    proxy = await make_proxy()
    task = asyncio.create_task(sdk(proxy).chat.completions.create(model="gpt-4o-2024-05-13",
                                                                  messages=HI))  # fmt: skip
    for _ in range(200):  # the client leaves while the call is at the upstream
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    for _ in range(100):
        if len(await proxy.rows()) == 1:
            break
        await asyncio.sleep(0.05)
    (row,) = await proxy.rows()
    # gpt-4o-2024-05-13: 9 x $5 + 70,000 x $15 per 1M = $1.050045
    assert (row["status"], row["usage_source"], row["cost_pico"]) == (
        499,
        "provider",
        1_050_045_000_000,
    )
    assert row["cost_pico"] == billed(upstream, 5, 15)


async def test_images_speech_and_transcriptions_are_priced(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    upstream, _ = fake
    proxy = await make_proxy()
    client = sdk(proxy)
    upstream.script.update(prompt_tokens=20, image_tokens=4160)
    await client.images.generate(model="gpt-image-1", prompt="a cat", n=2, size="1024x1024",
                                 quality="high")  # fmt: skip
    await client.images.generate(model="dall-e-3", prompt="a cat", size="1024x1792",
                                 quality="hd")  # fmt: skip
    await client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there!")
    wav = (b"RIFF" + struct.pack("<I", 36 + 32000 * 90) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16) + b"data" + struct.pack("<I", 32000 * 90)
        + b"\x00" * 1000)  # fmt: skip  # 90 s of 16 kHz 16-bit mono, by its header
    await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav))
    upstream.script.update(audio_tokens=1500)
    await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", wav))
    rows = await proxy.rows()
    costs = [(r["endpoint"], r["model_priced"], r["usage_source"], r["cost_pico"]) for r in rows]
    assert costs == [
        # 20 text tokens x $5/1M + 8,320 image tokens x $40/1M
        ("images/generations", "gpt-image-1", "provider", 20 * 5_000_000 + 8320 * 40_000_000),
        ("images/generations", "dall-e-3", "provider", 120_000_000_000),  # $0.12 an image
        ("audio/speech", "tts-1", "request", 12 * 15_000_000),  # 12 characters at $15/1M
        ("audio/transcriptions", "whisper-1", "estimated", 9_000_000_000),  # 1.5 min x $0.006
        # 1,500 audio tokens x $6/1M + 3 output tokens x $10/1M
        (
            "audio/transcriptions",
            "gpt-4o-transcribe",
            "provider",
            1500 * 6_000_000 + 3 * 10_000_000,
        ),
    ]


async def test_what_cannot_be_priced_is_refused_under_a_block_budget(
    make_proxy: ProxyFactory, fake: Any, tmp_path: Any
) -> None:
    """Batches, unknown models: forwarded at $0 for an agent whose block budget was spent.
    Now refused, naming the endpoint and budgets.unpriced; allowed, recorded unpriced."""
    upstream, _ = fake
    text = "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.000001}\n"
    proxy = await make_proxy(policies=policies(text))
    async with aiohttp.ClientSession() as s:
        for path, body in (("/v1/batches", {"input_file_id": "f", "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h"}),
                           ("/v1/chat/completions", {"model": "my-finetune-9", "messages": HI})):  # fmt: skip
            async with s.post(proxy.url + "/agents/agent" + path, json=body) as r:
                assert r.status == 403
                error = (await r.json())["error"]
            assert (
                error["code"] == "unpriced_call" and "budgets.unpriced: allow" in error["message"]
            )
        images = await asyncio.gather(*(
            s.post(proxy.url + "/agents/agent/v1/images/generations",
                   json={"model": "gpt-image-1", "prompt": "x"}) for _ in range(200)))  # fmt: skip
        assert {r.status for r in images} == {429}
    assert upstream.requests == []
    open_proxy = await make_proxy(unpriced="allow", policies=policies(text),
                                  db_url=f"sqlite:///{tmp_path / 'open.db'}")  # fmt: skip
    async with aiohttp.ClientSession() as s:
        async with s.post(open_proxy.url + "/agents/agent/v1/batches", json={"x": 1}) as r:
            assert r.status == 200
    (row,) = await open_proxy.rows()
    assert (row["cost_pico"], row["llm_calls"]) == (None, 1)  # unpriced, never a silent $0


async def test_a_responses_stream_is_cut_with_an_error_the_sdk_raises(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=2, chunks=2000, chunk_text=" the", token_chunks=True,
                           chunk_delay=0.001)  # fmt: skip
    proxy = await make_proxy(reserve_output_tokens=100, policies=policies(
        "budgets:\n  agents:\n    agent: {max_cost_per_day_usd: 0.005}\n"))  # fmt: skip
    stream = await sdk(proxy).responses.create(model="gpt-4o", input="hi", stream=True)
    texts = []
    with pytest.raises(openai.APIError) as e:
        async for event in stream:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
    assert "max_cost_per_day_usd" in e.value.message and "The stream was cut" in e.value.message
    assert 400 < len(texts) < 500  # $0.005 pays for about 499 output tokens
    assert billed(upstream, 2.5, 10) <= USD // 200
    (row,) = await proxy.rows()
    assert row["output_tokens"] == len(texts) and row["usage_source"] == "estimated"
