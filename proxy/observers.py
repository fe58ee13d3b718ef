"""Who hears of a call once it is recorded: metrics, the upstreams' health, telemetry."""

from __future__ import annotations

from typing import Protocol

from proxy.records import CallRecord


class CallObserver(Protocol):
    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool
    ) -> None:
        """Once per ledger row, after it is committed. Must only count or enqueue."""
