"""One log line per call, readable when tailed; `--log-format json` for machines.

`meterproxy serve` writes call lines straight to its log stream (`logs.LazyFlushHandler.
call_sink`): a LogRecord, a caller lookup and a flush per line cost about a tenth of the
proxy's throughput. Elsewhere (tests, embedding) they go through `logging` as usual; the
text is the same either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proxy.money import usd_exact, usd_fixed
from proxy.records import CallRecord

log = logging.getLogger("meterproxy.calls")
CallSink = Callable[[CallRecord, int | None], None]


def call_level(record: CallRecord) -> int:
    """WARNING for what an operator filters on (a refusal, an upstream 5xx, an upstream the
    proxy could not reach: 502/504), INFO for the rest."""
    return logging.WARNING if record.refused or record.status >= 500 else logging.INFO


def call_line(record: CallRecord, spent_today: int | None) -> str:
    cost = "unpriced" if record.cost_pico is None else f"${usd_fixed(record.cost_pico)}"
    today = f"${usd_fixed(spent_today)}" if spent_today is not None else "-"
    model = record.model_served or record.model_requested or "-"
    usage = "" if record.usage_source in ("provider", "none") else f" ({record.usage_source})"
    line = (
        f"{record.status} agent={record.agent} intent={record.intent or '-'} model={model}"
        f" in={record.input_tokens} out={record.output_tokens}{usage} cost={cost}"
        f" today={today} {record.latency_ms:.0f}ms {record.method} /{record.endpoint}"
        f" id={record.id}"
    )
    if record.error:
        line += f" error={record.error!r}"
    return line


def call_fields(record: CallRecord, spent_today: int | None) -> dict[str, Any]:
    return {
        "event": "call",
        "request_id": record.id,
        "agent": record.agent,
        "intent": record.intent,
        "upstream": record.upstream,
        "endpoint": record.endpoint,
        "model": record.model_requested,
        "model_served": record.model_served,
        "status": record.status,
        "stream": record.stream,
        "input_tokens": record.input_tokens,
        "cached_input_tokens": record.cached_input_tokens,
        "output_tokens": record.output_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "usage_source": record.usage_source,
        "cost_usd": usd_exact(record.cost_pico) if record.cost_pico is not None else None,
        "agent_spent_today_usd": usd_exact(spent_today) if spent_today is not None else None,
        "latency_ms": record.latency_ms,
        "ttfb_ms": record.ttfb_ms,
        "error": record.error,
    }


def log_call(record: CallRecord, spent_today: int | None) -> None:
    level = call_level(record)
    if log.isEnabledFor(level):
        log.log(level, call_line(record, spent_today),
                extra={"call": record, "spent_today": spent_today})  # fmt: skip
