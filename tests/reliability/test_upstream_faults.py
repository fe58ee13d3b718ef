"""Each upstream fault: the right answer for the client, a ledger row, a proxy that keeps
serving, and errors of the proxy's own in OpenAI's shape with `type: meterproxy_error`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from proxy.config import Timeouts, Upstream
from tests.conftest import Proxy, ProxyFactory

HI = [{"role": "user", "content": "hi"}]
BODY = {"model": "gpt-4o", "messages": HI}


async def post(proxy: Proxy, body: dict[str, Any] = BODY, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)


async def still_serving(proxy: Proxy, fake_url: str) -> None:
    """After the fault, a call to a healthy upstream goes through."""
    proxy.svc.config = proxy.svc.config.with_overrides(
        upstreams=(Upstream("fake", fake_url, default=True),)
    )
    status, body = await post(proxy)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello"


def proxy_error(body: Any, code: str) -> None:
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["type"] == "meterproxy_error" and body["error"]["code"] == code


@pytest.fixture
def closed_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused
    yield port


async def test_connection_refused_is_502(
    make_proxy: ProxyFactory, fake: Any, closed_port: int
) -> None:
    _, fake_url = fake
    proxy = await make_proxy(
        upstreams=(Upstream("down", f"http://127.0.0.1:{closed_port}/v1", default=True),)
    )
    status, body = await post(proxy)
    assert status == 502
    proxy_error(body, "upstream_unreachable")
    assert "upstream 'down' is unreachable" in body["error"]["message"]
    [row] = await proxy.rows()
    assert (row["status"], row["upstream"], row["usage_source"], row["cost_pico"]) == (
        502,
        "down",
        "none",
        0,
    )
    await still_serving(proxy, fake_url)


async def test_connect_timeout_is_504(make_proxy: ProxyFactory, fake: Any) -> None:
    _, fake_url = fake
    # A listening socket whose backlog is full and never accepted: new connects hang.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        proxy = await make_proxy(
            upstreams=(Upstream("stuck", f"http://127.0.0.1:{port}/v1", default=True),),
            timeouts=Timeouts(connect=0.3, read=5, stream_idle=5),
        )
        status, body = await post(proxy)
        assert status == 504
        proxy_error(body, "upstream_timeout")
        [row] = await proxy.rows()
        assert row["status"] == 504 and row["usage_source"] == "none"  # nothing reached it
        await still_serving(proxy, fake_url)
    finally:
        for c in fillers:
            c.close()
        server.close()


async def test_read_timeout_is_504_and_tokens_are_estimated(
    make_proxy: ProxyFactory, fake: Any
) -> None:
    upstream, fake_url = fake
    upstream.script.update(delay=2)
    proxy = await make_proxy(timeouts=Timeouts(connect=5, read=0.3, stream_idle=5))
    status, body = await post(proxy)
    assert status == 504
    proxy_error(body, "upstream_timeout")
    [row] = await proxy.rows()
    # The request went out: the provider may bill it, so the row is not left at zero.
    assert (row["status"], row["usage_source"], row["input_tokens"]) == (504, "estimated", 9)
    assert row["cost_pico"] == 9 * 2_500_000
    upstream.script.update(delay=0)
    await still_serving(proxy, fake_url)


async def test_body_that_is_not_json(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(not_json=True)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=BODY) as r:
            assert r.status == 200
            assert await r.text() == "<html>bad gateway</html>"  # passed through as it came
    [row] = await proxy.rows()
    assert (row["usage_source"], row["error"]) == ("estimated", "upstream body is not JSON")
    assert row["input_tokens"] == 9 and row["output_tokens"] > 0


async def test_nonsense_usage_is_estimated_not_trusted(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    for usage in (
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": "12", "completion_tokens": "x"},
    ):
        upstream.script.update(usage=usage)
        status, _ = await post(proxy)
        assert status == 200
    a, b = await proxy.rows()
    for row in (a, b):
        assert row["usage_source"] == "estimated" and row["input_tokens"] == 9
        assert row["error"].startswith("invalid provider usage")


async def test_stream_cut_midway(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(cut_after=3, chunks=10)
    received = b""
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**BODY, "stream": True}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # the client sees the cut
                async for chunk in r.content.iter_any():
                    received += chunk
    assert received.count(b"data: ") == 3 and b"[DONE]" not in received
    [row] = await proxy.rows()
    assert row["usage_source"] == "estimated" and row["output_tokens"] > 0
    assert row["error"].startswith("upstream stream cut")


async def test_stream_that_stalls(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, _ = fake
    upstream.script.update(stall_after=2)
    proxy = await make_proxy(timeouts=Timeouts(connect=5, read=5, stream_idle=0.3))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json={**BODY, "stream": True}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    [row] = await proxy.rows()
    assert row["error"] == "upstream stream idle for more than 0.3s"
    assert row["usage_source"] == "estimated"
    for _ in range(100):
        if upstream.cancelled:
            break
        await asyncio.sleep(0.01)
    assert upstream.cancelled == 1  # the stalled upstream request was dropped


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_upstream_errors_reach_the_client_unchanged(
    proxy: Proxy, fake: Any, status: int
) -> None:
    upstream, _ = fake
    error = {
        "error": {
            "message": f"provider says {status}",
            "type": "x",
            "code": f"c{status}",
            "param": None,
        }
    }
    upstream.script.update(status=status, error_body=error)
    got_status, body = await post(proxy)
    assert (got_status, body) == (status, error)
    [row] = await proxy.rows()
    assert row["status"] == status and row["error"] == f"upstream {status}: provider says {status}"
