"""Ledger rows for tests: a complete CallRecord with plain defaults, and only what a test
cares about spelled out."""

from __future__ import annotations

from typing import Any

from proxy.records import CallRecord


def call_record(id: str, started_at: float, **fields: Any) -> CallRecord:
    """A provider-priced 200 call of agent 'a' to gpt-4o, ended when it started, unless
    `fields` says otherwise."""
    values: dict[str, Any] = {
        "ended_at": started_at, "agent": "a", "intent": None, "upstream": "openai",
        "endpoint": "chat/completions", "method": "POST", "model_requested": "gpt-4o",
        "model_served": "gpt-4o", "model_priced": "gpt-4o", "status": 200, "stream": False,
        "input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 5,
        "reasoning_tokens": 0, "cache_write_tokens": 0, "cost_pico": 0,
        "usage_source": "provider", "service_tier": None, "price_version": None,
        "latency_ms": 1.0, "ttfb_ms": None, "error": None, "llm_calls": 1, "refused": False,
        "reserved_pico": 0,
    }  # fmt: skip
    values.update(fields)
    return CallRecord(id=id, started_at=started_at, **values)
