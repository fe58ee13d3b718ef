"""Fuzzing: random bodies, headers and SSE streams at the request parser and the usage
extractor, random answers at the upstream client. No crash, no unhandled exception: a
clear 4xx or a faithful pass-through."""

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
from proxy.money import usd_exact
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
            admin_token=FUZZ_ADMIN,
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


FUZZ_ADMIN = "fuzz-admin-token-0123456789"


def call(
    port: int, path: str, body: bytes, headers: dict[str, str], method: str = "POST",
    timeout: float = 30,
) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            method, path, body=body, headers={"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def still_answering(port: int) -> None:
    """Another call, answered within a second: nothing the fuzz sent wedged the proxy."""
    status, _ = call(port, "/v1/chat/completions",
                     b'{"model": "gpt-4o", "messages": []}', {}, timeout=1.0)  # fmt: skip
    assert status == 200


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


# -- numbers nobody expects, at every door money or tokens enter ---------------------------

ODD_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**19, 10**30,
                     100_000_000, 100_000_001, 1_000_000_000_000, 0.1, 1e-320, 1e19, 1e308,
                     -1e308, 5e6, 1e7]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)  # fmt: skip


def dumps(value: Any) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity included."""
    return json.dumps(value, allow_nan=True).encode()


@given(
    cost=ODD_NUMBERS, calls=ODD_NUMBERS, tokens_in=ODD_NUMBERS, tokens_out=ODD_NUMBERS,
    raw_cost=st.sampled_from(["1e309", "-1e309", "1" + "0" * 400, "0." + "0" * 400 + "1"]),
)  # fmt: skip
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_heartbeats_with_odd_numbers_get_a_clear_answer(
    live_proxy: tuple[int, FakeUpstream], cost: Any, calls: Any, tokens_in: Any, tokens_out: Any,
    raw_cost: str,
) -> None:  # fmt: skip
    port, _ = live_proxy
    body = {"agent": "fuzz", "metrics": {"cost_usd": cost, "llm_calls": calls,
                                         "tokens_in": tokens_in, "tokens_out": tokens_out}}  # fmt: skip
    for raw in (dumps(body), dumps(body).replace(dumps(cost), raw_cost.encode(), 1)):
        status, payload = call(port, "/meter/heartbeat", raw, {})
        assert status in (200, 400, 429), payload
        if status == 400:
            error = json.loads(payload)["error"]
            assert error["code"] in ("invalid_json", "invalid_heartbeat") and error["message"]
    still_answering(port)


POLICY_KEYS = st.sampled_from([
    "max_cost_per_day_usd", "max_cost_per_hour_usd", "max_cost_per_month_usd",
    "max_cost_per_intent_usd", "max_intents_per_day", "max_requests_per_minute",
])  # fmt: skip


@given(st.dictionaries(POLICY_KEYS, ODD_NUMBERS, min_size=1, max_size=3),
       st.one_of(st.none(), ODD_NUMBERS))  # fmt: skip
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_policies_with_odd_numbers_get_a_clear_answer(
    live_proxy: tuple[int, FakeUpstream], policy: dict[str, Any], guard: Any
) -> None:
    port, _ = live_proxy
    if guard is not None:
        policy = {
            **policy,
            "loop_guard": {"max_identical_requests": guard, "window_seconds": guard},
        }
    auth = {"Authorization": f"Bearer {FUZZ_ADMIN}"}
    status, payload = call(port, "/meter/agents/fuzz-policy/policy", dumps(policy), auth, "PUT")
    assert status in (200, 400), payload
    if status == 400:
        error = json.loads(payload)["error"]
        assert error["code"] in ("invalid_json", "invalid_policy") and error["message"]
    # A policy that was accepted holds on a call of that agent, and the proxy goes on.
    status, _ = call(port, "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}',
                     {"X-Agent-Id": "fuzz-policy"})  # fmt: skip
    assert status in (200, 429)
    call(port, "/meter/agents/fuzz-policy/policy", b"", auth, "DELETE")
    still_answering(port)


@given(st.fixed_dictionaries({}, optional={
    "prompt_tokens": ODD_NUMBERS, "completion_tokens": ODD_NUMBERS,
    "prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": ODD_NUMBERS}),
    "completion_tokens_details": st.fixed_dictionaries({"reasoning_tokens": ODD_NUMBERS}),
}), st.booleans())  # fmt: skip
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_upstream_usage_with_odd_numbers_is_never_priced_wrong(
    live_proxy: tuple[int, FakeUpstream], usage: dict[str, Any], stream: bool
) -> None:
    port, _ = live_proxy
    script = dumps({"usage": usage}).decode("latin-1")
    body = {"model": "gpt-4o", "messages": [], "stream": stream,
            "stream_options": {"include_usage": True}}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=dumps(body),
                     headers={"Content-Type": "application/json", "x-fake": script})  # fmt: skip
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        cost = response.getheader("x-meter-cost-usd")
    finally:
        conn.close()
    if not stream:  # the cost header says what was priced: the provider's, or an estimate
        expected = _priced(usage)
        if expected is not None:
            assert cost == usd_exact(expected)
    still_answering(port)


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100_000_000


def _priced(usage: dict[str, Any]) -> int | None:
    """gpt-4o's cost of a usage block the proxy must accept (None: it must not)."""
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens")
    reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens")
    if p is None and c is None:
        return None
    values = [v for v in (p, c, cached, reasoning) if v is not None]
    if not all(_whole(v) for v in values):
        return None
    p, c, cached, reasoning = p or 0, c or 0, cached or 0, reasoning or 0
    if cached > p or reasoning > c:
        return None
    return (p - cached) * 2_500_000 + cached * 1_250_000 + c * 10_000_000


_ANSWERS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 103 Early\r\n\r\nHTTP/1.0 404 No\r\n\r\nuntil the end",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
)


def _mutated(answer: bytes, edits: list[tuple[int, bytes]], cut: int | None) -> bytes:
    for at, piece in edits:
        answer = answer[:at] + piece + answer[at + len(piece) :]
    return answer if cut is None else answer[:cut]


UPSTREAM_ANSWERS = st.binary(max_size=200) | st.builds(
    _mutated,
    st.sampled_from(_ANSWERS),
    st.lists(st.tuples(st.integers(0, 90), st.binary(max_size=6)), max_size=4),
    st.none() | st.integers(0, 90),
)


@given(UPSTREAM_ANSWERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_upstream_client_survives_any_answer(answer: bytes) -> None:
    """Whatever bytes an upstream answers with (then hanging up): a response, or an
    UpstreamError or ReadTimeout, within the timeouts; never another exception, a hang,
    or a connection left open."""
    from proxy.http1 import ReadTimeout, UpstreamError
    from proxy.upstream_client import Timeout, UpstreamClient

    async def scenario() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await r.readuntil(b"\r\n\r\n")
                w.write(answer)
                await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        client = UpstreamClient()
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(3):
                try:
                    r = await client.request("GET", f"http://127.0.0.1:{port}/x", {}, None,
                                             Timeout(1, 0.5))  # fmt: skip
                    try:
                        body = await r.read()
                    finally:
                        r.release()
                    assert 100 <= r.status <= 999 and isinstance(body, bytes)
                except (UpstreamError, ReadTimeout):
                    pass
                await asyncio.sleep(0)
            assert client.open_connections <= 1  # at most one, kept for reuse
        finally:
            await client.close()
            server.close()

    asyncio.run(scenario())
