"""Spend reports: one query layer for `meterproxy report` and `GET /meter/spend`.

Whole 15-minute buckets come from the rollups (fast on any ledger size, and they outlive
pruned call rows); the ragged edges of a range that is not bucket-aligned come from call
rows. Totals are exact integer sums, so the total always equals the sum of the rows.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.budgets import Calendar
from proxy.money import usd_exact, usd_fixed
from proxy.storage import AggRow, Storage, Totals
from proxy.storage.base import BUCKET_SECONDS, GROUPS

WINDOWS = ("hour", "day", "week", "month")
_RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FIELDS = (
    "requests",
    "llm_calls",
    "refused",
    "errors",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
)


class ReportError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def parse_time(text: str, calendar: Calendar, now: float, param: str) -> float:
    """`2026-11-01` (local midnight), an ISO datetime, `7d`/`24h`/`30m`/`2w` ago, or epoch."""
    value = text.strip()
    m = _RELATIVE.match(value)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(
            param,
            f"{param}={text!r} is not a date (2026-11-01), a datetime (2026-11-01T09:00),"
            " a span ago (7d, 24h, 30m, 2w) or unix seconds",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=calendar.tz)
    return parsed.timestamp()


@dataclass
class ReportRow:
    key: str
    window_start: float | None
    totals: Totals = field(default_factory=Totals)


@dataclass
class Report:
    by: str
    window: str | None
    since: float | None
    until: float | None
    calendar: Calendar
    rows: list[ReportRow]
    total: Totals

    def row_json(self, row: ReportRow) -> dict[str, Any]:
        out: dict[str, Any] = {self.by: row.key}
        if self.window is not None and row.window_start is not None:
            out["window_start"] = self.calendar.iso(row.window_start)
        out["cost_usd"] = usd_exact(row.totals.cost_pico)
        for name in (*FIELDS, "unpriced"):
            out[name] = getattr(row.totals, name)
        return out

    def to_json(self) -> dict[str, Any]:
        total: dict[str, Any] = {"cost_usd": usd_exact(self.total.cost_pico)}
        for name in (*FIELDS, "unpriced"):
            total[name] = getattr(self.total, name)
        return {
            "by": self.by,
            "window": self.window,
            "timezone": self.calendar.tz_name,
            "since": self.calendar.iso(self.since) if self.since is not None else None,
            "until": self.calendar.iso(self.until) if self.until is not None else None,
            "rows": [self.row_json(r) for r in self.rows],
            "total": total,
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        header = [self.by, *(["window_start"] if self.window else []), "cost_usd", *FIELDS,
                  "unpriced"]  # fmt: skip
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            data = self.row_json(row)
            writer.writerow([data.get(h, "") for h in header])
        total = self.to_json()["total"]
        writer.writerow(["TOTAL", *([""] if self.window else []), *(total[h] for h in header[
            (2 if self.window else 1):])])  # fmt: skip
        return buf.getvalue()

    def to_table(self) -> str:
        head = [self.by.upper(), *(["WINDOW"] if self.window else []), "CALLS", "REFUSED", "IN",
                "OUT", "COST_USD"]  # fmt: skip
        lines = []
        for row in self.rows:
            t = row.totals
            cells = [row.key or "-"]
            if self.window:
                cells.append(self.calendar.iso(row.window_start or 0)[:16].replace("T", " "))
            cost = usd_fixed(t.cost_pico) + (f" (+{t.unpriced} unpriced)" if t.unpriced else "")
            cells += [str(t.llm_calls), str(t.refused), str(t.input_tokens), str(t.output_tokens),
                      cost]  # fmt: skip
            lines.append(cells)
        t = self.total
        total_row = ["TOTAL", *([""] if self.window else []), str(t.llm_calls), str(t.refused),
                     str(t.input_tokens), str(t.output_tokens), usd_fixed(t.cost_pico)]  # fmt: skip
        widths = [max(len(r[i]) for r in [head, *lines, total_row]) for i in range(len(head))]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i >= len(head) - 5 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [fmt(head), rule, *(fmt(r) for r in lines), rule, fmt(total_row)]
        note = f"(exact total {usd_exact(t.cost_pico)} USD"
        if t.unpriced:
            note += f"; {t.unpriced} calls unpriced: add their models to pricing.yaml"
        return "\n".join([*out, note + ")"])


async def spend_report(
    storage: Storage,
    calendar: Calendar,
    *,
    by: str = "agent",
    window: str | None = None,
    since: float | None = None,
    until: float | None = None,
    agent: str | None = None,
) -> Report:
    if by not in GROUPS:
        raise ReportError("by", f"by={by!r}: must be one of {', '.join(GROUPS)}")
    if window is not None and window not in WINDOWS:
        raise ReportError("window", f"window={window!r}: must be one of {', '.join(WINDOWS)}")
    lo = since if since is not None else 0.0
    hi = until if until is not None else 2.0**40
    if hi <= lo:
        raise ReportError("until", "until must be later than since")
    split = window is not None
    parts: list[AggRow] = []
    if by == "intent":
        parts += await storage.aggregate_calls(lo, hi, by, agent, split)
    else:
        a = -(-int(lo) // BUCKET_SECONDS) * BUCKET_SECONDS
        b = int(hi) // BUCKET_SECONDS * BUCKET_SECONDS
        if a >= b:
            parts += await storage.aggregate_calls(lo, hi, by, agent, split)
        else:
            parts += await storage.aggregate_rollups(a, b, by, agent, split)
            if lo < a:
                parts += await storage.aggregate_calls(lo, a, by, agent, split)
            if b < hi:
                parts += await storage.aggregate_calls(b, hi, by, agent, split)
    merged: dict[tuple[str, float | None], ReportRow] = {}
    starts: dict[int, float] = {}
    for part in parts:
        start = None
        if window is not None and part.bucket is not None:
            start = starts.get(part.bucket)
            if start is None:
                start = starts[part.bucket] = calendar.window_start(window, part.bucket)
        row = merged.get((part.key, start))
        if row is None:
            row = merged[(part.key, start)] = ReportRow(part.key, start)
        row.totals.add(part.totals)
    rows = sorted(merged.values(), key=lambda r: (r.window_start or 0, -r.totals.cost_pico, r.key))
    total = Totals()
    for row in rows:
        total.add(row.totals)
    return Report(by, window, since, until, calendar, rows, total)
