"""Fuzzing: random bodies, headers and SSE streams at the request parser and the usage
extractor. No crash, no unhandled exception: a clear 4xx or a faithful pass-through."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app, runner_options
from proxy.config import Config, Upstream
from proxy.shapes.openai import ChatReader, facts_from_body, output_texts, parse_usage, prompt
from proxy.sse import StreamMeter
from proxy.tokens import TokenCounter
from proxy.usage import InvalidUsage
from tests.fake_upstream import FakeUpstream

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
KEYS = st.sampled_from(["model", "messages", "input", "prompt", "stream", "stream_options", "max_tokens",
                        "n", "tools", "instructions", "usage", "choices", "content", "role"])  # fmt: skip
BODIES = st.dictionaries(KEYS | st.text(max_size=8), JSON, max_size=6)
COUNTER = TokenCounter()


@given(JSON)
@settings(max_examples=300, deadline=None)
def test_usage_extraction_never_crashes(value: Any) -> None:
    with contextlib.suppress(InvalidUsage):
        parse_usage(value)
    for wrapped in (value, {"usage": value}, {"object": "response", "usage": value, "output": value},
                    {"choices": value}, {"type": "response.completed", "response": value}):  # fmt: skip
        facts_from_body(wrapped)
        assert all(isinstance(t, str) for t in output_texts(wrapped))


@given(BODIES)
@settings(max_examples=300, deadline=None)
def test_prompt_counting_never_crashes(body: dict[str, Any]) -> None:
    assert COUNTER.count_prompt("gpt-4o", prompt(body)) >= 0


EVENTS = st.one_of(
    JSON.map(lambda v: b"data: " + json.dumps(v).encode()),
    st.just(b"data: [DONE]"),
    st.just(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'),
    st.just(
        b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":1}}}'
    ),
    st.binary(max_size=40),
)


SEPARATORS = st.sampled_from([b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\r\n"])


@given(
    st.lists(st.tuples(EVENTS, SEPARATORS), max_size=12),
    st.lists(st.integers(1, 64), min_size=1, max_size=30),
)
@settings(max_examples=400, deadline=None)
def test_stream_meter_passes_streams_through_faithfully(
    events: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(e + sep for e, sep in events)
    chunks, i = [], 0
    for n in cuts * (len(stream) // max(sum(cuts), 1) + 1):
        if i >= len(stream):
            break
        chunks.append(stream[i : i + n])
        i += n
    meter = StreamMeter(ChatReader(False))
    out = b"".join(meter.feed(c) for c in chunks) + meter.finish()
    assert out == stream  # what the client gets is what the upstream sent
    stripping = StreamMeter(ChatReader(True))
    stripped = b"".join(stripping.feed(c) for c in chunks) + stripping.finish()
    assert len(stripped) <= len(stream)
    meter.generated_texts()


# -- the whole request path, on a live proxy ----------------------------------------------------


@pytest.fixture(scope="module")
def live_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, FakeUpstream]]:
    """A proxy and a fake upstream on their own event loop thread, for sync fuzz clients."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}
    db: Path = tmp_path_factory.mktemp("fuzz") / "ledger.db"

    async def main() -> None:
        fake = FakeUpstream()
        fake_runner = web.AppRunner(fake.app())
        await fake_runner.setup()
        await web.TCPSite(fake_runner, "127.0.0.1", 0).start()
        config = Config(
            upstreams=(
                Upstream(
                    "fake", f"http://127.0.0.1:{fake_runner.addresses[0][1]}/v1", default=True
                ),
            ),
            db_url=f"sqlite:///{db}",
        )
        runner = web.AppRunner(create_app(config), **runner_options(config))  # type: ignore[arg-type]
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state.update(port=runner.addresses[0][1], fake=fake, stop=asyncio.Event())
        ready.set()
        await state["stop"].wait()
        await runner.cleanup()
        await fake_runner.cleanup()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield state["port"], state["fake"]
    loop.call_soon_threadsafe(state["stop"].set)
    thread.join(30)


def call(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


HEADER_TEXT = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=140
)


@given(
    body=BODIES | st.binary(max_size=200).map(lambda b: {"__raw__": b.hex()}),
    model=st.one_of(st.none(), st.sampled_from(["gpt-4o", "gpt-4o-mini", "nope-9", ""]), JSON),
    agent=st.one_of(st.none(), HEADER_TEXT),
    intent=st.one_of(st.none(), HEADER_TEXT),
    path=st.sampled_from(
        ["/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions"]
    ),
)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_requests_get_a_4xx_or_go_through(live_proxy: tuple[int, FakeUpstream], body: dict[str, Any],
                                                  model: Any, agent: str | None, intent: str | None,
                                                  path: str) -> None:  # fmt: skip
    port, _ = live_proxy
    if "__raw__" in body:
        raw = bytes.fromhex(body["__raw__"])
    else:
        if model is not None:
            body = {**body, "model": model}
        raw = json.dumps(body).encode()
    headers = {}
    if agent is not None:
        headers["X-Agent-Id"] = agent
    if intent is not None:
        headers["X-Intent-Id"] = intent
    try:
        headers_ok = all(v.encode("latin-1") for v in headers.values())
    except UnicodeEncodeError:
        headers_ok = False
    if not headers_ok:
        return
    status, payload = call(port, path, raw, headers)
    assert status < 500, payload
    if status >= 400:
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "code", "param"} and error["message"]
    # and the proxy still answers a plain call
    ok, _ = call(port, "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}', {})
    assert ok == 200
