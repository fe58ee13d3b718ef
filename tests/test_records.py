"""The ledger row's own check: what no engine could store is caught before it joins a
batch (the fast common case and the full check must agree)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.bounds import INT64_MAX
from tests.records import call_record


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"cost_pico": 2**63}, "cost_pico=9223372036854775808 is not a whole number"),
        ({"cost_pico": -1}, "cost_pico=-1 is not a whole number"),
        ({"cost_pico": 1.5}, "cost_pico=1.5 is not a whole number"),
        ({"output_tokens": True}, "output_tokens=True is not a whole number"),
        ({"input_tokens": 2**64}, "input_tokens=18446744073709551616 is not a whole number"),
        ({"status": "200"}, "status='200' is not a whole number"),
        ({"latency_ms": float("nan")}, "latency_ms=nan is not a finite number"),
        ({"ended_at": float("inf")}, "ended_at=inf is not a finite number"),
        ({"ended_at": None}, "ended_at=None is not a finite number"),
        ({"agent": "a\x00b"}, "agent contains a NUL character"),
        ({"error": "upstream 500: \x00"}, "error contains a NUL character"),
    ],
)
def test_a_row_no_engine_can_store_names_its_field(fields: dict[str, Any], problem: str) -> None:
    (found,) = call_record("req_1", 1_795_000_000.5, **fields).problems()
    assert found.startswith(problem)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"cost_pico": None, "model_priced": None},  # unpriced
        {"cost_pico": INT64_MAX, "reserved_pico": INT64_MAX},
        {"ended_at": 1_795_000_001, "latency_ms": 0},  # ints where floats go: stored fine
        {"intent": "task-\u00e9\u4e2d", "tags": "env=prod", "error": "upstream 429: slow down"},
    ],
)
def test_a_storable_row_has_no_problems(fields: dict[str, Any]) -> None:
    assert call_record("req_1", 1_795_000_000.5, **fields).problems() == []
