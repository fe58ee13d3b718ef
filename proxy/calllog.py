"""One log line per call, readable when tailed; `--log-format json` for machines."""

from __future__ import annotations

import logging

from proxy.money import usd_fixed
from proxy.records import CallRecord

log = logging.getLogger("meterproxy.calls")


def log_call(record: CallRecord, spent_today: int | None) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
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
    log.info(line, extra={"call": record, "spent_today": spent_today})
