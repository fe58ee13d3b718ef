"""Hardening, items 6-8 of the issue: what an upstream sends cannot make the proxy buffer
without bound, lose a final event's usage, or meter compressed bytes."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import aiohttp
import openai

from tests.conftest import Proxy, ProxyFactory

HI = [{"role": "user", "content": "hi"}]


async def test_bytes_after_the_final_event_are_cut_not_buffered(proxy: Proxy, fake: Any) -> None:
    """Item 6: an upstream that keeps sending after `data: [DONE]` (19 MB here, 300 MB in
    the report) no longer grows the proxy: at most 64 KiB after the final event is kept,
    then the upstream is cut. The client gets [DONE] and a clean end; the row is exact."""
    upstream, _ = fake
    upstream.script.update(after_final=19 * 1024 * 1024)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={
            "model": "gpt-4o", "messages": HI, "stream": True,
            "stream_options": {"include_usage": True}}) as r:  # fmt: skip
            body = await r.read()
    done = body.index(b"data: [DONE]\n\n")
    assert 0 < len(body) - done <= 14 + 64 * 1024  # the final event, then at most 64 KiB
    assert upstream.after_final_sent < 19 * 1024 * 1024  # cut long before the end
    (row,) = await proxy.rows()
    assert (row["usage_source"], row["input_tokens"], row["output_tokens"]) == ("provider", 12, 5)
    assert row["cost_pico"] == 80_000_000  # gpt-4o: 12 x $2.50/1M + 5 x $10/1M
    assert row["error"].startswith("upstream sent more than 65536 bytes after the final event")


async def test_a_client_that_stops_reading_stops_the_upstream(proxy: Proxy, fake: Any) -> None:
    """A 64 MB stream whose client takes 1 MB and then reads nothing for a second: the proxy
    stops reading the upstream too, so what the upstream got to send is bounded by the
    sockets' buffers, not by the stream. Then every byte arrives, in order, and the row
    has the provider's usage."""
    upstream, _ = fake
    piece = "x" * (64 * 1024)
    upstream.script.update(chunks=1024, chunk_text=piece, completion_tokens=1024)
    async with aiohttp.ClientSession(read_bufsize=2**16) as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={
            "model": "gpt-4o", "messages": HI, "stream": True,
            "stream_options": {"include_usage": True}}) as r:  # fmt: skip
            received = len(await r.content.readexactly(1 << 20))
            await asyncio.sleep(1.0)
            sent_while_stalled = upstream.chunks_sent
            while chunk := await r.content.read(1 << 20):
                received += len(chunk)
                if chunk.endswith(b"data: [DONE]\n\n"):
                    tail = chunk
    assert sent_while_stalled < 512, sent_while_stalled  # at most half of the 1,024 pieces
    assert upstream.chunks_sent == 1024 + 2  # the pieces, the usage chunk and [DONE]
    events = 1024 * len(
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,'
        b'"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"'
        b'"},"finish_reason":null}],"usage":null}\n\n'
    ) + 1024 * len(piece)
    assert received > events and tail.endswith(b"data: [DONE]\n\n")
    (row,) = await proxy.rows()
    assert (row["usage_source"], row["output_tokens"], row["error"]) == ("provider", 1024, None)


async def test_a_final_event_then_silence_is_delivered(proxy: Proxy, fake: Any) -> None:
    """The upstream sends [DONE] and keeps the connection open without ending it: the
    client still gets [DONE] within a second, not after stream_idle (300 s)."""
    upstream, _ = fake
    upstream.script.update(hold_open=True)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0)
    started = time.monotonic()
    stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 5 and time.monotonic() - started < 10
    (row,) = await proxy.rows()
    assert (row["usage_source"], row["error"]) == ("provider", None)


def _final_event(instructions: str) -> bytes:
    response = {
        "id": "resp_big", "object": "response", "status": "completed", "model": "gpt-5",
        "instructions": instructions, "output": [],
        "usage": {"input_tokens": 300_000, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 1516, "output_tokens_details": {"reasoning_tokens": 1500}},
        "user": None, "metadata": {},
    }  # fmt: skip
    data = json.dumps({"type": "response.completed", "response": response})
    return f"event: response.completed\ndata: {data}\n\n".encode()


async def _responses_stream(
    proxy: Proxy, fake: Any, instructions: str
) -> tuple[bytes, dict[str, Any]]:
    upstream, _ = fake
    upstream.script.update(echo_instructions=True)
    created = b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_big","object":"response","model":"gpt-5"}}\n\n'
    delta = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"hi"}\n\n'
    final = _final_event(instructions)

    async def handler(request: Any) -> Any:
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in (created, delta):
            await resp.write(part)
        for i in range(0, len(final), 256 * 1024):
            await resp.write(final[i : i + 256 * 1024])
        await resp.write_eof()
        return resp

    upstream.handle_override = handler  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/responses", json={
            "model": "gpt-5", "input": "hi", "instructions": instructions, "stream": True}) as r:  # fmt: skip
            body = await r.read()
    (row,) = await proxy.rows()
    assert body == created + delta + final  # relayed byte for byte
    return body, row


async def test_a_4mb_final_event_still_yields_provider_usage(proxy: Proxy, fake: Any) -> None:
    """Item 7: a Responses final event echoing megabytes of instructions was past the
    1 MiB parse limit: usage was estimated (33 output tokens instead of 1,516, reasoning
    lost). Events are parsed up to 16 MiB now."""
    _, row = await _responses_stream(proxy, fake, "Follow these rules. " * 200_000)  # 4 MB
    assert (row["usage_source"], row["output_tokens"], row["reasoning_tokens"]) == (
        "provider", 1516, 1500,
    )  # fmt: skip
    assert row["response_id"] == "resp_big" and row["error"] is None


async def test_a_final_event_past_the_parse_limit_keeps_its_usage(proxy: Proxy, fake: Any) -> None:
    """Over 16 MiB an event is passed on unparsed; its usage is read from its last bytes."""
    _, row = await _responses_stream(proxy, fake, "x" * (17 * 1024 * 1024))
    assert (row["usage_source"], row["input_tokens"], row["output_tokens"]) == (
        "provider", 300_000, 1516,
    )  # fmt: skip
    # gpt-5: 300,000 x $1.25/1M + 16 x $10/1M + 1,500 reasoning x $10/1M
    assert row["cost_pico"] == 300_000 * 1_250_000 + 1516 * 10_000_000


async def test_a_gzip_request_body_goes_on_consistent(proxy: Proxy, fake: Any) -> None:
    """Item 8: a gzip body was decompressed for metering but forwarded with
    Content-Encoding: gzip on the decompressed bytes (upstream 400)."""
    upstream, _ = fake
    body = gzip.compress(json.dumps({"model": "gpt-4o", "messages": HI}).encode())
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:  # fmt: skip
            assert r.status == 200
    seen = upstream.requests[0]
    assert "Content-Encoding" not in seen.headers and seen.json()["model"] == "gpt-4o"
    (row,) = await proxy.rows()
    assert row["cost_pico"] == 80_000_000


async def test_a_compressed_json_answer_is_metered_decoded_and_passed_as_sent(
    proxy: Proxy, fake: Any
) -> None:
    """The upstream compresses although asked for identity: the cost is read from the
    decoded body (it was 3.85x too high), the client gets the bytes the upstream sent."""
    upstream, _ = fake
    upstream.script.update(compress="gzip", prompt_tokens=1000, completion_tokens=200)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": HI}) as r:  # fmt: skip
            raw = await r.read()
            assert r.headers["Content-Encoding"] == "gzip"
            assert r.headers["x-meter-cost-usd"] == "0.0045"  # 1000 x 2.5/1M + 200 x 10/1M
    assert json.loads(gzip.decompress(raw))["usage"]["prompt_tokens"] == 1000
    (row,) = await proxy.rows()
    assert (row["usage_source"], row["input_tokens"], row["output_tokens"]) == (
        "provider",
        1000,
        200,
    )


async def test_a_compressed_stream_is_metered_and_its_added_usage_chunk_removed(
    proxy: Proxy, fake: Any
) -> None:
    """A gzip SSE stream was metered from compressed bytes (20x too low) and the usage
    chunk the proxy injected reached a client that did not ask for it."""
    upstream, _ = fake
    upstream.script.update(compress="gzip", prompt_tokens=1000, completion_tokens=200)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0)
    stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    chunks = [c async for c in stream]
    assert len(chunks) == 5 and all(c.usage is None for c in chunks)  # no usage chunk
    (row,) = await proxy.rows()
    assert (row["usage_source"], row["input_tokens"], row["output_tokens"]) == (
        "provider",
        1000,
        200,
    )
    assert row["cost_pico"] == 4_500_000_000


async def test_an_encoding_the_proxy_cannot_read_is_passed_through_and_estimated(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    from aiohttp import web

    upstream, _ = fake

    async def handler(request: Any) -> Any:
        return web.Response(body=b"\x00\x01binary", headers={
            "Content-Type": "text/event-stream", "Content-Encoding": "x-custom"})  # fmt: skip

    upstream.handle_override = handler  # type: ignore[attr-defined]
    proxy = await make_proxy()
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(proxy.url + "/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": HI, "stream": True}) as r:  # fmt: skip
            assert await r.read() == b"\x00\x01binary"
    (row,) = await proxy.rows()
    assert row["usage_source"] == "estimated" and "x-custom" in row["error"]
