"""Hardening, items 3 and 4 of the issue: no second spelling of a metered path, and no web
page can spend through, or read, a proxy on the user's machine."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config_file import parse_config
from tests.conftest import Proxy, ProxyFactory, raw_request

TOKEN = "test-admin-token-0123456789"
BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'


async def spent_proxy(make_proxy: ProxyFactory) -> Proxy:
    """An agent whose block budget cannot pay for any call."""
    text = "budgets:\n  agents:\n    a: {max_cost_per_day_usd: 0.000001}\n"
    return await make_proxy(policies=parse_config(yaml.safe_load(text)).policies)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions/",
        "/v1/chat//completions",
        "/v1//chat/completions",
        "/v1/chat/completions%2F",
        "/v1/chat%2Fcompletions",
        "/v1/Chat/Completions",
        "/agents/a/v1//chat/completions/",
    ],
)
async def test_every_spelling_of_a_metered_path_is_metered(
    make_proxy: ProxyFactory, fake: Any, path: str
) -> None:
    upstream, _ = fake
    proxy = await spent_proxy(make_proxy)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Agent-Id: a\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + BODY
    status, body = await raw_request(proxy, request)
    assert status == 429 and b"max_cost_per_day_usd" in body
    assert upstream.requests == []  # never forwarded under another spelling


async def test_unmetered_paths_go_on_in_their_canonical_spelling(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    status, _ = await raw_request(
        proxy, b"GET /v1/files//file-abc/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and [r.path for r in upstream.requests] == ["/v1/files/file-abc"]


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded",
                                  "multipart/form-data; boundary=x"])  # fmt: skip
async def test_a_web_page_cannot_spend_through_the_proxy(
    make_proxy: ProxyFactory, fake: Any, kind: str
) -> None:
    """Item 4: `fetch(..., {mode: "no-cors"})` with a text/plain body was forwarded with
    the proxy's own api_key. Browsers send Origin with it: 403 before anything is sent."""
    upstream, url = fake
    from proxy.config import Upstream

    proxy = await make_proxy(
        upstreams=(Upstream("fake", url, api_key="sk-proxy-own", default=True),)
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", data=BODY, headers={
            "Origin": "https://evil.example", "Content-Type": kind}) as r:  # fmt: skip
            assert r.status == 403
            error = (await r.json())["error"]
        assert (
            error["code"] == "origin_not_allowed" and "server.allowed_origins" in error["message"]
        )
        # Without Origin (not a browser), a non-JSON body is refused too: a metered body is JSON.
        async with s.post(proxy.url + "/v1/chat/completions", data=BODY,
                          headers={"Content-Type": kind}) as r:  # fmt: skip
            assert r.status == 415
    assert upstream.requests == []


@pytest.mark.parametrize("path", ["/metrics", "/v1/models", "/meter/health", "/meter/dashboard"])
async def test_dns_rebinding_cannot_read_the_proxy(proxy: Proxy, fake: Any, path: str) -> None:
    upstream, _ = fake
    status, body = await raw_request(
        proxy,
        f"GET {path} HTTP/1.1\r\nHost: attacker.example:8787\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 421 and b"server.allowed_hosts" in body
    assert upstream.requests == []


async def test_the_proxys_own_names_and_ip_literals_are_served(proxy: Proxy) -> None:
    port = proxy.server.port
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "10.1.2.3"):
        status, _ = await raw_request(
            proxy,
            f"GET /meter/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == 200, host


async def test_allowed_hosts_and_a_keyed_open_proxy(make_proxy: ProxyFactory, fake: Any) -> None:
    _, url = fake
    named = await make_proxy(allowed_hosts=("proxy.internal", ".corp.example"))
    for host, expected in (("proxy.internal", 200), ("a.corp.example", 200), ("evil.example", 421)):
        status, _ = await raw_request(
            named,
            f"GET /meter/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == expected, host
    from proxy.config import Upstream

    keyed = await make_proxy(host="0.0.0.0", keys={"mp-key-12345678": "a"},
                             upstreams=(Upstream("fake", url, api_key="sk-up", default=True),))  # fmt: skip
    status, _ = await raw_request(
        keyed,
        b"GET /meter/health HTTP/1.1\r\nHost: proxy.anything.example\r\nConnection: close\r\n\r\n",
    )
    assert status == 200  # bound beyond loopback with keys: a key guards it, not the name


async def test_the_dashboards_own_origin_is_allowed(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(admin_token=TOKEN)
    origin = proxy.url  # http://127.0.0.1:PORT: what the dashboard's fetch sends
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/meter/agents/a/pause", json={"force": True}, headers={
            "Origin": origin, "Authorization": f"Bearer {TOKEN}"}) as r:  # fmt: skip
            assert r.status == 200
        async with s.post(proxy.url + "/meter/agents/a/resume", headers={
            "Origin": "http://127.0.0.1:1", "Authorization": f"Bearer {TOKEN}"}) as r:  # fmt: skip
            assert r.status == 403  # another port is another origin


async def test_an_allowed_origin_gets_cors(make_proxy: ProxyFactory, fake: Any) -> None:
    proxy = await make_proxy(allowed_origins=("https://app.example.com",))
    async with aiohttp.ClientSession() as s:
        async with s.options(proxy.url + "/v1/chat/completions", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"}) as r:  # fmt: skip
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
            assert r.headers["Access-Control-Allow-Headers"] == "content-type, authorization"
        for stream in (False, True):
            async with s.post(proxy.url + "/v1/chat/completions", data=BODY.replace(
                b'"max_tokens": 5', b'"max_tokens": 5, "stream": %s' % (b"true" if stream else b"false")),
                headers={"Origin": "https://app.example.com",
                         "Content-Type": "application/json"}) as r:  # fmt: skip
                assert r.status == 200
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
                await r.read()
        async with s.post(proxy.url + "/v1/chat/completions", data=BODY, headers={
            "Origin": "https://other.example.com", "Content-Type": "application/json"}) as r:  # fmt: skip
            assert r.status == 403
