"""Who hears of a call once it is recorded: metrics, the upstreams' health, telemetry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from proxy.records import CallRecord


class CallObserver(Protocol):
    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool,
        trace: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Once per ledger row, after it is committed. Must only count or enqueue.
        `trace`: the client's W3C trace context headers (traceparent, tracestate)."""
