"""The ledger row: one per call the proxy answered (and one per heartbeat report)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from proxy.bounds import INT64_MAX
from proxy.usage import Usage

_INTS = ("status", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
         "cache_write_tokens", "llm_calls", "reserved_pico")  # fmt: skip
_FLOATS = ("started_at", "ended_at", "latency_ms")


@dataclass(slots=True)
class CallRecord:
    id: str
    started_at: float  # unix seconds
    ended_at: float
    agent: str
    intent: str | None
    upstream: str | None
    endpoint: str  # e.g. chat/completions, responses, heartbeat, or the raw path tail
    method: str
    model_requested: str | None
    model_served: str | None
    model_priced: str | None  # the price-table entry used, None when unpriced
    status: int
    stream: bool
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cache_write_tokens: int
    cost_pico: int | None  # None: unpriced (unknown model)
    usage_source: str
    service_tier: str | None
    price_version: str | None
    latency_ms: float
    ttfb_ms: float | None
    error: str | None
    llm_calls: int  # LLM calls this row stands for: 1 forwarded, 0 refused, N for a heartbeat
    refused: bool  # refused by a budget, a pause or the loop guard
    reserved_pico: int  # what admission reserved (audit: actual vs worst case)

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_row(self) -> tuple[object, ...]:
        return (
            self.id,
            self.started_at,
            self.ended_at,
            self.agent,
            self.intent,
            self.upstream,
            self.endpoint,
            self.method,
            self.model_requested,
            self.model_served,
            self.model_priced,
            self.status,
            int(self.stream),
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.cache_write_tokens,
            self.cost_pico,
            self.usage_source,
            self.service_tier,
            self.price_version,
            self.latency_ms,
            self.ttfb_ms,
            self.error,
            self.llm_calls,
            int(self.refused),
            self.reserved_pico,
        )

    def problems(self) -> list[str]:
        """Why this row cannot be stored as it is (empty: it can). Every engine stores
        integers in 64 bits, and PostgreSQL's text cannot hold a NUL character: a row
        that breaks either would fail its whole batch."""
        out = []
        for name in _INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
                out.append(f"{name}={value!r} is not a whole number in [0, 2^63)")
        cost = self.cost_pico
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int)
                                 or not 0 <= cost <= INT64_MAX):  # fmt: skip
            out.append(f"cost_pico={cost!r} is not a whole number in [0, 2^63)")
        for name in _FLOATS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                out.append(f"{name}={value!r} is not a finite number")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and "\x00" in value:
                out.append(f"{f.name} contains a NUL character")
        return out

    @classmethod
    def from_row(cls, row: Sequence[object]) -> CallRecord:
        """The inverse of `as_row` (rows replayed from a spool file)."""
        record = cls(*row)  # type: ignore[arg-type]
        record.stream = bool(record.stream)
        record.refused = bool(record.refused)
        return record

    def set_usage(self, usage: Usage) -> None:
        self.input_tokens = usage.input_tokens
        self.cached_input_tokens = usage.cached_input_tokens
        self.output_tokens = usage.output_tokens
        self.reasoning_tokens = usage.reasoning_tokens
        self.cache_write_tokens = usage.cache_write_tokens
        self.usage_source = usage.source
        if usage.service_tier is not None:
            self.service_tier = usage.service_tier
