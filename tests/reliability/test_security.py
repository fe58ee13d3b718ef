"""The proxy only talks to configured upstreams, guards its admin API, and keeps secrets
and prompts out of logs, the ledger, error messages and /metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config import Upstream
from tests.conftest import Proxy, ProxyFactory, raw_request

HI = [{"role": "user", "content": "hi"}]


async def test_requests_only_ever_go_to_the_configured_upstream(proxy: Proxy, fake: Any) -> None:
    upstream, _ = fake
    # An absolute URI names another server: the path is what counts, the proxy's upstream
    # is where it goes.
    status, body = await raw_request(
        proxy, b"GET http://evil.example:9/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n",
    )  # fmt: skip
    assert status == 200 and b'"gpt-4o"' in body
    assert [r.path for r in upstream.requests] == ["/v1/models"]  # it reached the fake: no one else


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../meter/agents",
        b"/v1/%2e%2e/meter/agents",
        b"/v1/%2E%2E%2Fmeter",
        b"/v1/chat/..%2f..%2fadmin",
        b"/v1/%252e%252e/x",
        b"/v1/http://evil.example/x",
        b"/agents/a/v1/../../meter/agents",
    ],
)
async def test_paths_cannot_climb_out(proxy: Proxy, fake: Any, path: bytes) -> None:
    upstream, _ = fake
    status, _body = await raw_request(
        proxy, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    assert status in (400, 404)
    assert upstream.requests == []


SECRETS = {
    "upstream": "sk-upstreamSECRET111",
    "admin": "adminSECRET222-long-enough",
    "proxy_key": "mp-key-SECRET333",
    "azure": "azureSECRET444",
}


async def test_secrets_and_prompts_never_leak(
    make_proxy: ProxyFactory, fake: Any, caplog: Any
) -> None:
    upstream, url = fake
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(
        upstreams=(Upstream("fake", url, api_key=SECRETS["upstream"], default=True),),
        admin_token=SECRETS["admin"],
        keys={SECRETS["proxy_key"]: "secure-agent"},
    )
    prompt = "my confidential prompt about the merger"
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=SECRETS["proxy_key"], max_retries=0,
                                default_headers={"api-key": SECRETS["azure"]})  # fmt: skip
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": prompt}]
    )
    stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    _ = [c async for c in stream]
    # The provider refuses and echoes the key, as OpenAI does ("Incorrect API key provided").
    upstream.script.update(status=401, error_body={"error": {
        "message": f"Incorrect API key provided: {SECRETS['upstream']}.", "type": "invalid_request_error"}})  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    upstream.script.update(status=200)
    bad = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-wrongSECRET555", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        await bad.chat.completions.create(model="gpt-4o", messages=HI)
    errors = [str(e.value.body)]
    async with aiohttp.ClientSession() as s:
        async with s.get(
            proxy.url + "/meter/agents", headers={"Authorization": "Bearer wrongSECRET666"}
        ) as r:
            errors.append(await r.text())
        async with s.get(proxy.url + "/metrics") as r:
            metrics = await r.text()
        async with s.get(
            proxy.url + "/meter/calls", headers={"Authorization": f"Bearer {SECRETS['admin']}"}
        ) as r:
            calls = await r.text()
    await proxy.flushed()
    ledger = await proxy.svc.storage.fetch("SELECT * FROM calls")
    stored = " ".join(str(v) for row in ledger for v in row)
    logs = " ".join(r.getMessage() for r in caplog.records)
    everything = {
        "logs": logs,
        "ledger": stored,
        "metrics": metrics,
        "calls api": calls,
        "errors": " ".join(errors),
    }
    for where, text in everything.items():
        for secret in (*SECRETS.values(), "sk-wrongSECRET555", "wrongSECRET666"):
            assert secret not in text, f"{secret} leaked into {where}"
        assert "SECRET" not in text, where
        assert prompt not in text and "confidential" not in text, where
    assert len(ledger) == 4
    # The provider's own error passes through to the client unchanged; ours are redacted.
    assert "upstream 401: Incorrect API key provided: sk-***" in stored
    # The real key went to the provider, the proxy key and Azure-style key did not.
    sent = upstream.requests[0].headers
    assert sent["Authorization"] == f"Bearer {SECRETS['upstream']}" and "api-key" not in sent


def test_binding_beyond_loopback_without_keys_or_token_warns(tmp_path: Any) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--host", "0.0.0.0", "--port", "0",
         "--db", str(tmp_path / "l.db")],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening on http://" in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = "".join(lines)
    assert re.search(
        r"WARNING\s+listening on 0\.0\.0\.0 without proxy keys or an admin token", text
    )
    assert proc.returncode == 0


async def test_default_listen_address_is_loopback() -> None:
    from proxy.config_file import load_config

    assert load_config(None).host == "127.0.0.1"
    await asyncio.sleep(0)
