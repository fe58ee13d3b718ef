"""OpenTelemetry: what we meter, in the form observability stacks read.

A span per recorded call, named and attributed by the GenAI semantic conventions
(`gen_ai.*`, status Development) plus our cost (`meterproxy.cost_usd`, no standard name
exists), a child of the client's `traceparent` when it sends one; and the conventions'
metrics (`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`) with a cost
counter. Exported by OTLP over HTTP (protobuf) from the SDK's own threads: the call path
only builds the span and hands it to a bounded queue (full: dropped, never waited on).

Providers are our own instances, not the process-wide globals: two apps in one process
(the tests) export apart, and shutdown flushes ours only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

from proxy.config import TelemetryConfig
from proxy.money import usd_exact
from proxy.records import CallRecord

log = logging.getLogger("meterproxy.telemetry")
PICO = 1e12
# gen_ai.operation.name by endpoint; other endpoints keep their own path as the name.
_OPERATIONS = {
    "chat/completions": "chat", "responses": "chat", "messages": "chat",
    "completions": "text_completion", "embeddings": "embeddings",
    "generateContent": "generate_content", "streamGenerateContent": "generate_content",
}  # fmt: skip
# gen_ai.provider.name by our upstream provider.
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "azure": "azure.ai.openai",
              "gemini": "gcp.gemini"}  # fmt: skip


def operation_of(endpoint: str) -> str:
    for suffix, name in _OPERATIONS.items():
        if endpoint == suffix or endpoint.endswith(":" + suffix) or endpoint.endswith("/" + suffix):
            return name
    return endpoint or "unknown"


def attributes(record: CallRecord) -> dict[str, str | int | float]:
    """The span's attributes for a ledger row (pure: tested without an exporter)."""
    attrs: dict[str, str | int | float] = {
        "gen_ai.operation.name": operation_of(record.endpoint),
        "gen_ai.provider.name": _PROVIDERS.get(record.provider or "openai", record.provider or ""),
        "gen_ai.agent.name": record.agent,
        "gen_ai.usage.input_tokens": record.input_tokens,
        "gen_ai.usage.output_tokens": record.output_tokens,
        "http.response.status_code": record.status,
        "meterproxy.call_id": record.id,
        "meterproxy.usage_source": record.usage_source,
    }
    optional: Mapping[str, str | int | None] = {
        "gen_ai.request.model": record.model_requested,
        "gen_ai.response.model": record.model_served,
        "gen_ai.response.id": record.response_id,
        "gen_ai.conversation.id": record.intent,
        "gen_ai.usage.cache_read.input_tokens": record.cached_input_tokens or None,
        "gen_ai.usage.cache_creation.input_tokens": record.cache_write_tokens or None,
        "gen_ai.usage.reasoning.output_tokens": record.reasoning_tokens or None,
        "meterproxy.upstream": record.upstream,
        "meterproxy.end_user": record.end_user,
        "meterproxy.tags": record.tags,
        "meterproxy.error": record.error,
    }
    attrs |= {k: v for k, v in optional.items() if v is not None}
    if record.cost_pico is not None:
        # A string: the exact decimal, as the ledger has it (a float would round it).
        attrs["meterproxy.cost_usd"] = usd_exact(record.cost_pico)
    if record.refused:
        attrs["meterproxy.refused"] = 1
    if record.status >= 400 or record.error:
        attrs["error.type"] = str(record.status) if record.status >= 400 else "error"
    return attrs


_METRIC_KEYS = (
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.agent.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
)


class Telemetry:
    """The call observer that exports spans and metrics (see the module's docstring)."""

    def __init__(self, config: TelemetryConfig) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        assert config.endpoint is not None
        base = config.endpoint.rstrip("/")
        headers = dict(config.headers)
        try:
            ours = version("meterproxy")
        except PackageNotFoundError:
            ours = "0"
        resource = Resource.create({"service.name": config.service_name,
                                    "service.version": ours})  # fmt: skip
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=f"{base}/v1/traces", headers=headers, timeout=10),
            max_queue_size=8192,
        ))  # fmt: skip
        self.tracer = self.tracer_provider.get_tracer("meterproxy", ours)
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers, timeout=10),
            export_interval_millis=config.metrics_interval_seconds * 1000,
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = self.meter_provider.get_meter("meterproxy", ours)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per call, by gen_ai.token.type (input, output)",
            explicit_bucket_boundaries_advisory=[1, 4, 16, 64, 256, 1024, 4096, 16384, 65536,
                                                 262144, 1048576, 4194304, 16777216],
        )  # fmt: skip
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of each call",
            explicit_bucket_boundaries_advisory=[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                                                 2.56, 5.12, 10.24, 20.48, 40.96, 81.92],
        )  # fmt: skip
        self.cost = meter.create_counter("meterproxy.cost", unit="USD",
                                         description="Spend of priced calls")  # fmt: skip
        self._kind = SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._propagator = TraceContextTextMapPropagator()

    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool,
        trace: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        attrs = attributes(record)
        parent = self._propagator.extract(trace) if trace else None
        model = record.model_requested or record.model_served
        name = f"{attrs['gen_ai.operation.name']} {model}" if model else str(
            attrs["gen_ai.operation.name"])  # fmt: skip
        start = int(record.started_at * 1e9)
        end = int(max(record.ended_at, record.started_at) * 1e9)
        span = self.tracer.start_span(name, context=parent, kind=self._kind, attributes=attrs,
                                      start_time=start)  # fmt: skip
        if "error.type" in attrs:
            span.set_status(self._error)
        span.end(end_time=end)
        if record.llm_calls == 0 and not forwarded:
            return  # a refusal: no tokens, no duration of an operation
        common: dict[str, str | int | float] = {k: attrs[k] for k in _METRIC_KEYS if k in attrs}
        self.tokens.record(record.input_tokens, common | {"gen_ai.token.type": "input"})
        self.tokens.record(record.output_tokens, common | {"gen_ai.token.type": "output"})
        if record.ended_at >= record.started_at:
            self.duration.record(record.ended_at - record.started_at, common)
        if record.cost_pico:
            self.cost.add(record.cost_pico / PICO, common)

    async def flush(self, seconds: float = 10.0) -> bool:
        """Export what is queued now; False when the collector did not take it in time."""
        millis = int(seconds * 1000)

        def work() -> None:
            self.tracer_provider.force_flush(millis)
            self.meter_provider.force_flush(millis)

        return await _in_daemon(work, seconds)

    async def shutdown(self, seconds: float = 5.0) -> None:
        """Export what is queued and stop, in at most `seconds`: a dead collector (the
        exporter retries with backoff) must not hold up the exit."""
        millis = int(seconds * 1000)

        def work() -> None:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=millis)

        done = await _in_daemon(work, seconds)
        if not done:
            log.warning("telemetry: the collector did not take the last spans in %.0f s", seconds)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _in_daemon(work: Callable[[], None], seconds: float) -> bool:
    """Run blocking SDK work in a daemon thread (the default executor would be waited for
    at exit); True when it finished within `seconds`."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def run() -> None:
        try:
            work()
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_resolve, finished)

    threading.Thread(target=run, name="meterproxy-telemetry-flush", daemon=True).start()
    try:
        async with asyncio.timeout(seconds):
            await finished
    except TimeoutError:
        return False
    return True
