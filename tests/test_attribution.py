from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Upstream
from tests.conftest import Proxy, ProxyFactory, raw_request

HI = [{"role": "user", "content": "hi"}]


async def agents_of(proxy: Proxy) -> list[tuple[str, str | None]]:
    return [(r["agent"], r["intent"]) for r in await proxy.rows()]


async def test_header_path_prefix_and_default(proxy: Proxy) -> None:
    by_header = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0,
        default_headers={"X-Agent-Id": "by-header", "X-Intent-Id": "int_abc123"},
    )  # fmt: skip
    await by_header.chat.completions.create(model="gpt-4o", messages=HI)
    # An unchanged agent, attributed by OPENAI_BASE_URL alone.
    by_path = openai.AsyncOpenAI(
        base_url=proxy.url + "/agents/research-agent/v1", api_key="sk-x", max_retries=0
    )
    await by_path.chat.completions.create(model="gpt-4o", messages=HI)
    anonymous = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0)
    await anonymous.chat.completions.create(model="gpt-4o", messages=HI)
    assert await agents_of(proxy) == [
        ("by-header", "int_abc123"),
        ("research-agent", None),
        ("anonymous", None),
    ]


async def test_configurable_header_names_and_default_agent(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(
        agent_header="X-Team-Bot", intent_header="X-Task", default_agent="nobody"
    )
    async with aiohttp.ClientSession() as s:
        for headers in ({"X-Team-Bot": "bot-7", "X-Task": "t9"}, {"X-Agent-Id": "ignored"}):
            async with s.post(proxy.url + "/v1/chat/completions", headers=headers,
                              json={"model": "gpt-4o", "messages": HI}) as r:  # fmt: skip
                assert r.status == 200
    assert await agents_of(proxy) == [("bot-7", "t9"), ("nobody", None)]


@pytest.mark.parametrize(
    ("headers", "path", "message"),
    [
        ({"X-Agent-Id": "a" * 129}, "/v1", "header X-Agent-Id: the agent id is 129 characters long; at most 128"),
        ({"X-Agent-Id": "bad\tagent"}, "/v1", "header X-Agent-Id: the agent id contains a control or non-printable character"),
        ({}, "/agents/bad%01agent/v1", "path /agents/{agent}/: the agent id contains a control"),
    ],
)  # fmt: skip
async def test_bad_ids_get_400_naming_the_header(
    proxy: Proxy, fake: Any, headers: dict[str, str], path: str, message: str
) -> None:
    upstream, _ = fake
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path + "/chat/completions", headers=headers,
                          json={"model": "gpt-4o", "messages": HI}) as r:  # fmt: skip
            assert r.status == 400
            error = (await r.json())["error"]
    assert error["message"].startswith(message)
    assert error["code"] in ("invalid_agent_id", "invalid_intent_id")
    assert upstream.requests == []


async def test_proxy_keys_bind_the_agent(make_proxy: ProxyFactory, fake: Any) -> None:
    upstream, url = fake
    proxy = await make_proxy(
        keys={"mp-key-research-0001": "research-agent"},
        upstreams=(Upstream("fake", url, api_key="sk-real-upstream-key", default=True),),
    )
    keyed = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1", api_key="mp-key-research-0001", max_retries=0,
        default_headers={"X-Agent-Id": "spoofed", "X-Intent-Id": "i1"},
    )  # fmt: skip
    await keyed.chat.completions.create(model="gpt-4o", messages=HI)
    # The header could not override the key's agent, and the provider got the real key.
    assert upstream.requests[-1].headers["Authorization"] == "Bearer sk-real-upstream-key"
    for api_key in ("sk-not-a-proxy-key", None):
        async with aiohttp.ClientSession() as s:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            async with s.post(proxy.url + "/v1/chat/completions", headers=headers,
                              json={"model": "gpt-4o", "messages": HI}) as r:  # fmt: skip
                assert r.status == 401
                error = (await r.json())["error"]
                assert error["code"] in ("invalid_api_key", "missing_api_key")
                assert "sk-not-a-proxy-key" not in error["message"]
    assert len(upstream.requests) == 1  # never forwarded
    assert (await agents_of(proxy))[0] == ("research-agent", "i1")


async def test_control_character_in_intent_header(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    body = b'{"model": "gpt-4o", "messages": []}'
    status, payload = await raw_request(
        proxy,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        # U+0085 (a C1 control) in UTF-8: HTTP parsers pass such bytes on as obs-text.
        b"X-Intent-Id: loop\xc2\x85id\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert status == 400
    assert b"header X-Intent-Id: the intent id contains a control" in payload
    assert upstream.requests == []
