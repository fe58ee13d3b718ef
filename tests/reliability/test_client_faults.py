"""Client faults and bad input: a clear 4xx, or the call recorded and its reservation
released; never a crash, never a proxy that stops serving."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config_file import parse_config
from proxy.logs import ClientFaultFilter
from tests.conftest import Proxy, ProxyFactory, raw_request

HI = [{"role": "user", "content": "hi"}]


async def healthy(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}
        ) as r:
            assert r.status == 200


async def budget_proxy(make_proxy: ProxyFactory, text: dict[str, Any], **kw: Any) -> Proxy:
    return await make_proxy(policies=parse_config({"budgets": text}).policies, **kw)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (json.dumps({"messages": HI}).encode(), 400, "missing_model"),
        (json.dumps({"model": 42, "messages": HI}).encode(), 400, "invalid_model"),
    ],
)
async def test_bad_bodies_get_openai_shaped_errors(
    proxy: Proxy, fake: Any, body: bytes, status: int, code: str
) -> None:
    upstream, _ = fake
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == status
            payload = await r.json()
    assert set(payload["error"]) == {"message", "type", "code", "param"}
    assert payload["error"]["code"] == code
    assert payload["error"]["type"] == "meterproxy_error"
    assert upstream.requests == []
    [row] = await proxy.rows()
    assert row["status"] == status


async def test_disconnected_and_cancelled_calls_leave_no_reservation(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    upstream, _ = fake
    upstream.script.update(gate_after=2, chunks=6)
    proxy = await budget_proxy(make_proxy, {"defaults": {"max_cost_per_day_usd": 100}})
    enforcer = proxy.svc.enforcer
    body = {"model": "gpt-4o", "messages": HI, "stream": True, "max_tokens": 50}
    # A client that reads two chunks and hangs up.
    async with aiohttp.ClientSession() as s:
        r = await s.post(proxy.url + "/v1/chat/completions", json=body)
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        assert enforcer.outstanding == 1
        r.close()
    # A client of a non-streamed call that leaves before the answer: the provider goes on
    # (and bills) anyway, so the proxy lets it finish and records what it billed.
    upstream.script.update(delay=0.5)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    task = asyncio.create_task(client.chat.completions.create(model="gpt-4o", messages=HI))
    for _ in range(200):
        if len(upstream.requests) == 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.1)
    assert enforcer.outstanding == 1  # its reservation holds until the answer comes
    for _ in range(300):
        if (
            enforcer.outstanding == 0
            and proxy.svc.ledger.backlog == 0
            and len(await proxy.rows()) == 2
        ):
            break
        await asyncio.sleep(0.01)
    assert (enforcer.outstanding, enforcer.outstanding_pico) == (0, 0)
    streamed, finished = await proxy.rows()
    assert streamed["error"] == "cancelled: the client disconnected"
    # What had been generated when the client left: "tok0 tok1 " is 5 cl100k tokens.
    assert streamed["usage_source"] == "estimated" and streamed["output_tokens"] == 5
    assert (finished["status"], finished["usage_source"], finished["cost_pico"]) == (
        499, "provider", 80_000_000,
    )  # fmt: skip
    assert finished["error"] == "client disconnected; the upstream's answer was recorded"
    # The stream's upstream request was dropped when its client left; the other finished.
    for _ in range(200):
        if upstream.cancelled == 1:
            break
        await asyncio.sleep(0.01)
    assert upstream.cancelled == 1 and upstream.served == 1
    upstream.gate.set()


async def test_body_over_max_body_bytes_is_413(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    proxy = await make_proxy(max_body_bytes=4096)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 413
            error = (await r.json())["error"]
    assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]
    assert upstream.requests == []
    [row] = await proxy.rows()
    assert row["status"] == 413
    await healthy(proxy)


async def test_header_flood_and_oversized_header(proxy: Proxy, caplog: Any) -> None:
    caplog.set_level(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    fault_filter = ClientFaultFilter()  # what `meterproxy serve` installs
    server_log.addFilter(fault_filter)
    try:
        flood = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        status, _ = await raw_request(
            proxy, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + flood + b"\r\n"
        )
        assert status in (400, 431)
        huge = b"X-Big: " + b"a" * 20_000 + b"\r\n"
        status, _ = await raw_request(
            proxy, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge + b"\r\n"
        )
        assert status in (400, 431)
    finally:
        server_log.removeFilter(fault_filter)
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records and all(r.levelno == logging.WARNING and r.exc_info is None for r in records)
    assert all(r.getMessage().startswith("rejected a malformed request") for r in records)
    await healthy(proxy)


async def test_slow_loris_connections_are_closed(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(keepalive_timeout=0.5)
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    await writer.drain()
    closed = await asyncio.wait_for(reader.read(), timeout=5)  # EOF: the server hung up
    assert closed == b""
    writer.close()
    await healthy(proxy)


async def test_a_body_that_never_finishes_is_408(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    proxy = await make_proxy(body_timeout=0.3)
    status, payload = await raw_request(
        proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": "gpt-4o",',  # 980 bytes never come
    )
    assert status == 408 and json.loads(payload)["error"]["code"] == "request_timeout"
    assert upstream.requests == []
    await healthy(proxy)


async def test_sdk_timeout_mid_stream_is_a_disconnect(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(chunk_delay=1.0, chunks=5)  # silent longer than the 0.5 s timeout
    proxy = await budget_proxy(make_proxy, {"defaults": {"max_cost_per_day_usd": 10}})
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
        async for _ in stream:
            pass
    for _ in range(200):
        if proxy.svc.enforcer.outstanding == 0 and proxy.svc.ledger.backlog == 0:
            break
        await asyncio.sleep(0.01)
    assert proxy.svc.enforcer.outstanding == 0
    [row] = await proxy.rows()
    assert row["usage_source"] == "estimated" and row["status"] == 499


async def test_a_stream_whose_client_leaves_before_its_head_is_dropped_at_once(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    """A stream is cut with its client: the upstream request goes when the client goes,
    not when the provider's head arrives, and the row and the reservation with it."""
    upstream, _ = fake
    upstream.script.update(delay=2.0)
    proxy = await budget_proxy(make_proxy, {"defaults": {"max_cost_per_day_usd": 100}})
    enforcer = proxy.svc.enforcer
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
    task = asyncio.create_task(
        client.chat.completions.create(model="gpt-4o", messages=HI, stream=True, max_tokens=50)
    )
    for _ in range(200):
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    assert enforcer.outstanding == 1
    task.cancel()
    rows: list[dict[str, Any]] = []
    for _ in range(50):  # 0.5 s: well before the head would come
        rows = await proxy.rows() if proxy.svc.ledger.backlog == 0 else []
        if rows and enforcer.outstanding == 0:
            break
        await asyncio.sleep(0.01)
    assert [(r["status"], r["error"]) for r in rows] == [
        (499, "cancelled: the client disconnected")
    ]
    assert (enforcer.outstanding, enforcer.outstanding_pico) == (0, 0)
    assert rows[0]["usage_source"] == "estimated" and rows[0]["output_tokens"] == 0
