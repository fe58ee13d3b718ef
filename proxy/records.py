"""The ledger row: one per call the proxy answered (and one per heartbeat report)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields

from proxy.bounds import INT64_MAX
from proxy.usage import NONE, Usage

_INTS = ("status", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
         "cache_write_tokens", "llm_calls", "reserved_pico")  # fmt: skip
_FLOATS = ("started_at", "ended_at", "latency_ms")


@dataclass(slots=True)
class CallRecord:
    id: str
    started_at: float  # unix seconds
    ended_at: float = 0.0
    agent: str = "anonymous"
    intent: str | None = None
    upstream: str | None = None
    endpoint: str = ""  # e.g. chat/completions, messages, heartbeat, or the path
    method: str = "POST"
    model_requested: str | None = None
    model_served: str | None = None
    model_priced: str | None = None  # the price-table entry used, None when unpriced
    status: int = 0
    stream: bool = False
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    cost_pico: int | None = 0  # None: unpriced (unknown model, unpriced endpoint)
    usage_source: str = NONE
    service_tier: str | None = None
    price_version: str | None = None
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    error: str | None = None
    llm_calls: int = 0  # LLM calls this row stands for: 1 forwarded, 0 refused, N heartbeat
    refused: bool = False  # refused by a budget, a pause or the loop guard
    reserved_pico: int = 0  # what admission reserved, extensions included (audit)
    # Since migration 007:
    provider: str | None = None  # openai | anthropic | azure | gemini
    end_user: str | None = None  # the agent's customer (hashed if attribution.hash_users)
    tags: str | None = None  # X-Meter-Tags, normalised: "env=prod,team=search"
    response_id: str | None = None  # the provider's id of the response (chains, background)
    shadow_limit: str | None = None  # a dry-run limit that would have refused this call

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return _COLUMNS

    def as_row(self) -> tuple[object, ...]:
        row = list(_GET(self))
        row[_STREAM] = int(self.stream)
        row[_REFUSED] = int(self.refused)
        return tuple(row)

    def problems(self) -> list[str]:
        """Why this row cannot be stored as it is (empty: it can). Every engine stores
        integers in 64 bits, and PostgreSQL's text cannot hold a NUL character: a row
        that breaks either would fail its whole batch."""
        if _plainly_storable(self):
            return []
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
        """The inverse of `as_row` (rows replayed from a spool file, including files an
        older version wrote, with fewer columns: the rest take their defaults)."""
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


_COLUMNS = tuple(f.name for f in fields(CallRecord))
_GET = operator.attrgetter(*_COLUMNS)
_STREAM = _COLUMNS.index("stream")
_REFUSED = _COLUMNS.index("refused")
_GET_INTS = operator.attrgetter(*_INTS, "cost_pico")
_GET_FLOATS = operator.attrgetter(*_FLOATS)
# Every other column: the full check looks for NUL in any text, whatever the field's type.
_GET_OTHERS = operator.attrgetter(
    *(c for c in _COLUMNS if c not in (*_INTS, "cost_pico", *_FLOATS))
)
_INT, _FLOAT, _BIG = int, float, 1e300


def _plainly_storable(record: CallRecord) -> bool:
    """The common case of `problems`, in one pass without string formatting (it runs for
    every row): plain ints in range, finite floats, texts without NUL. Anything else,
    including values that may still be fine (an int subclass), gets the full check."""
    for v in _GET_INTS(record):
        if v.__class__ is not _INT or not 0 <= v <= INT64_MAX:
            if v is None:  # cost_pico of an unpriced call
                continue
            return False
    for v in _GET_FLOATS(record):
        if v.__class__ is not _FLOAT or not -_BIG < v < _BIG:  # NaN fails both
            return False
    for v in _GET_OTHERS(record):  # noqa: SIM110 (a loop: all() over a generator is slower)
        if isinstance(v, str) and "\x00" in v:
            return False
    return True


def new_record(id: str, started_at: float, agent: str, endpoint: str, method: str) -> CallRecord:
    """A call's row as it starts: nothing answered, nothing spent yet."""
    return CallRecord(id, started_at, agent=agent, endpoint=endpoint, method=method)
