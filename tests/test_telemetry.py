"""OpenTelemetry export: spans and metrics reach a real OTLP/HTTP receiver on loopback,
decoded with the collector's own protobuf messages."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from proxy.config import TelemetryConfig
from proxy.config_file import parse_config
from proxy.records import CallRecord
from proxy.telemetry import attributes, operation_of
from tests.conftest import ProxyFactory

HI = [{"role": "user", "content": "hi"}]
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


class Collector:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.metrics: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.got = asyncio.Event()

    async def traces(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest.FromString(await request.read())
        for rs in msg.resource_spans:
            self.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        self.got.set()
        return web.Response(content_type="application/x-protobuf")

    async def metrics_in(self, request: web.Request) -> web.Response:
        msg = ExportMetricsServiceRequest.FromString(await request.read())
        for rm in msg.resource_metrics:
            for sm in rm.scope_metrics:
                self.metrics.extend(sm.metrics)
        return web.Response(content_type="application/x-protobuf")


def attrs_of(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


async def test_a_span_per_call_and_the_token_histogram(
    make_proxy: ProxyFactory, fake: Any, aiohttp_server: Any
) -> None:
    upstream, _ = fake
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    app.router.add_post("/v1/metrics", collector.metrics_in)
    server = await aiohttp_server(app)
    endpoint = str(server.make_url("")).rstrip("/")
    policies = parse_config({"budgets": {"agents": {"capped": {"max_cost_per_day_usd": 1e-6}}}})
    proxy = await make_proxy(
        telemetry=TelemetryConfig(enabled=True, endpoint=endpoint, service_name="mp-test"),
        policies=policies.policies,
    )
    upstream.script.update(prompt_tokens=1200, completion_tokens=300, cached_tokens=1000,
                           reasoning_tokens=200)  # fmt: skip
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/coder/v1", api_key="k",
                                max_retries=0)  # fmt: skip
    traceparent = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    await client.chat.completions.create(
        model="gpt-4o", messages=HI,
        extra_headers={"X-Intent-Id": "ticket-42", "traceparent": traceparent},
    )  # fmt: skip
    refused = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/capped/v1", api_key="k",
                                 max_retries=0)  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        await refused.chat.completions.create(model="gpt-4o", messages=HI)
    await proxy.flushed()
    telemetry = proxy.svc.telemetry
    assert telemetry is not None and await telemetry.flush(10)
    assert len(collector.spans) == 2
    assert collector.resources[0]["service.name"] == "mp-test"
    span = next(s for s in collector.spans if attrs_of(s)["gen_ai.agent.name"] == "coder")
    rows = await proxy.rows()
    row = next(r for r in rows if r["agent"] == "coder")
    assert span.name == "chat gpt-4o"
    assert span.kind == 3  # SPAN_KIND_CLIENT
    assert span.trace_id.hex() == PARENT_TRACE and span.parent_span_id.hex() == PARENT_SPAN
    a = attrs_of(span)
    assert a == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.agent.name": "coder", "gen_ai.conversation.id": "ticket-42",
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": row["model_served"],
        "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.reasoning.output_tokens": 200,
        "http.response.status_code": 200, "meterproxy.call_id": row["id"],
        "meterproxy.usage_source": "provider", "meterproxy.upstream": "fake",
        # 200 x $2.50 + 1000 x $1.25 + 300 x $10 per million = $0.00475
        "meterproxy.cost_usd": "0.00475",
    }  # fmt: skip
    assert span.end_time_unix_nano - span.start_time_unix_nano == pytest.approx(
        (row["ended_at"] - row["started_at"]) * 1e9, abs=1000
    )
    other = next(s for s in collector.spans if s is not span)
    assert attrs_of(other)["meterproxy.refused"] == 1
    assert attrs_of(other)["error.type"] == "429" and other.status.code == 2  # ERROR
    names = {m.name: m for m in collector.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "meterproxy.cost"} <= set(names)  # fmt: skip
    points = names["gen_ai.client.token.usage"].histogram.data_points
    by_type = {next(a.value.string_value for a in p.attributes if a.key == "gen_ai.token.type"):
               p for p in points}  # fmt: skip
    assert (by_type["input"].sum, by_type["output"].sum) == (1200, 300)
    assert by_type["input"].count == 1  # the refusal used no tokens
    assert names["meterproxy.cost"].sum.data_points[0].as_double == pytest.approx(0.00475)


async def test_a_dead_collector_does_not_hold_up_calls_or_the_exit(
    make_proxy: ProxyFactory, fake: Any, unused_tcp_port: int
) -> None:
    proxy = await make_proxy(telemetry=TelemetryConfig(
        enabled=True, endpoint=f"http://127.0.0.1:{unused_tcp_port}"))  # fmt: skip
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
    for _ in range(20):
        await client.chat.completions.create(model="gpt-4o", messages=HI)
    telemetry = proxy.svc.telemetry
    loop = asyncio.get_running_loop()
    started = loop.time()
    await telemetry.shutdown(1.0)
    assert loop.time() - started < 1.5


def test_operation_names_and_attributes_of_other_shapes() -> None:
    assert [operation_of(e) for e in ("chat/completions", "responses", "messages",
                                      "completions", "embeddings",
                                      "models/gemini-2.5-pro:generateContent",
                                      "images/generations")] == [
        "chat", "chat", "chat", "text_completion", "embeddings", "generate_content",
        "images/generations"]  # fmt: skip
    rec = CallRecord("req_1", 1.0, 2.0, agent="a", endpoint="messages", provider="anthropic",
                     model_requested="claude-sonnet-4-5", status=200, cost_pico=None,
                     cache_write_tokens=7)  # fmt: skip
    a = attributes(rec)
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.usage.cache_creation.input_tokens"] == 7
    assert "meterproxy.cost_usd" not in a  # unpriced: no number rather than a wrong one


def test_config_from_the_file_and_the_sdk_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agents-prod")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-team=search,authorization=Bearer t")
    t = parse_config({}).telemetry
    assert (t.enabled, t.endpoint, t.service_name) == (True, "http://collector:4318", "agents-prod")
    assert dict(t.headers) == {"x-team": "search", "authorization": "Bearer t"}
    assert parse_config({"telemetry": {"enabled": False}}).telemetry.enabled is False
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    assert parse_config({}).telemetry.enabled is False
    errors: list[Any] = []
    parse_config({"telemetry": {"endpoint": "collector:4318", "protocol": "grpc"}}, sink=errors)
    assert [e.key for e in errors] == ["telemetry.endpoint", "telemetry.protocol"]
    assert "only http/protobuf is supported" in str(errors[1])
