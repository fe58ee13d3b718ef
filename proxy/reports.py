"""Spend reports: one query layer for `meterproxy report` and `GET /meter/spend`.

Whole 15-minute buckets come from the rollups (fast on any ledger size, and they outlive
pruned call rows); the ragged edges of a range that is not bucket-aligned come from call
rows. Totals are exact integer sums, so the total always equals the sum of the rows.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proxy.money import usd_exact, usd_sig
from proxy.storage import AggRow, Storage, Totals
from proxy.storage.base import BUCKET_SECONDS, CALL_GROUPS, GROUPS, Grouping
from proxy.windows import Calendar

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
    "shadowed",
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
        # One number format for the column, with 3 significant digits of the smallest
        # cost: an embeddings row is not "0.000000" beside a chat row.
        costs = usd_sig(*(r.totals.cost_pico for r in self.rows), self.total.cost_pico,
                        significant=3, min_places=2)  # fmt: skip
        for row, shown in zip(self.rows, costs, strict=False):
            t = row.totals
            cells = [row.key or "-"]
            if self.window:
                cells.append(self.calendar.iso(row.window_start or 0)[:16].replace("T", " "))
            cost = shown + (f" (+{t.unpriced} unpriced)" if t.unpriced else "")
            cells += [str(t.llm_calls), str(t.refused), str(t.input_tokens), str(t.output_tokens),
                      cost]  # fmt: skip
            lines.append(cells)
        t = self.total
        total_row = ["TOTAL", *([""] if self.window else []), str(t.llm_calls), str(t.refused),
                     str(t.input_tokens), str(t.output_tokens), costs[-1]]  # fmt: skip
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


def offset_segments(calendar: Calendar, lo: float, hi: float) -> list[tuple[float, float, int]]:
    """[lo, hi) cut where the zone's UTC offset changes: (start, end, offset seconds)."""
    tz = calendar.tz

    def offset(t: float) -> int:
        delta = datetime.fromtimestamp(t, tz).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    segments = []
    start, current, probe = lo, offset(lo), lo
    while probe < hi:
        step = min(probe + 7 * 86400, hi)  # zones change offset a few times a year at most
        last = step if step < hi else hi - 0.5  # a moment inside [lo, hi)
        if offset(last) == current:
            probe = step
            continue
        a, b = probe, last  # offset(a) == current != offset(b): bisect the change
        while b - a > 0.5:
            mid = (a + b) / 2
            a, b = (mid, b) if offset(mid) == current else (a, mid)
        change = float(math.floor(b))  # changes happen on whole seconds, in (a, b]
        segments.append((start, change, current))
        start = probe = change
        current = offset(change)
    segments.append((start, hi, current))
    return [seg for seg in segments if seg[1] > seg[0]]


_MONDAY = 4 * 86400  # 1970-01-01 was a Thursday: epoch weeks start on Monday + 4 days


def grouping_for(window: str, offset: int) -> Grouping:
    """Fixed-width windows for one stretch of constant offset; months go by day."""
    if window == "hour":
        return Grouping(offset, 3600)
    if window == "week":
        return Grouping(offset - _MONDAY, 7 * 86400)
    return Grouping(offset, 86400)  # day, and month (days merged into months below)


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
    group, _, tag = by.partition(":")
    if group not in GROUPS or (group == "tag") != bool(tag):
        raise ReportError(
            "by", f"by={by!r}: must be one of {', '.join(g for g in GROUPS if g != 'tag')},"
            " or tag:KEY (the values of one tag, e.g. tag:team)",
        )  # fmt: skip
    if window is not None and window not in WINDOWS:
        raise ReportError("window", f"window={window!r}: must be one of {', '.join(WINDOWS)}")
    if since is not None and until is not None and until <= since:
        raise ReportError("until", "until must be later than since")
    source = "calls" if group in CALL_GROUPS else "rollups"
    await storage.sync_rollups()
    span = await storage.time_span(source)
    rows: dict[tuple[str, float | None], ReportRow] = {}
    if span is not None:
        lo = max(since, span[0]) if since is not None else span[0]
        hi = min(until, span[1] + 1) if until is not None else span[1] + 1
        for kind, a, b in _pieces(group, lo, hi):
            await _collect(storage, calendar, kind, a, b, group, window, agent, rows)
    if tag:
        rows = _by_tag(rows, tag)
    ordered = sorted(rows.values(), key=lambda r: (r.window_start or 0, -r.totals.cost_pico, r.key))
    total = Totals()
    for row in ordered:
        total.add(row.totals)
    return Report(by, window, since, until, calendar, ordered, total)


def _by_tag(
    rows: dict[tuple[str, float | None], ReportRow], key: str
) -> dict[tuple[str, float | None], ReportRow]:
    """Rows of tag sets (`env=prod,team=search`) as rows of one tag's values: a call has
    one value of a tag at most, so the rows still add up to the total."""
    out: dict[tuple[str, float | None], ReportRow] = {}
    for (tags, start), row in rows.items():
        value = dict(t.split("=", 1) for t in tags.split(",") if "=" in t).get(key, "")
        _merge(out, value, start, row.totals)
    return out


def _pieces(by: str, lo: float, hi: float) -> list[tuple[str, float, float]]:
    """Whole buckets from the rollups; ragged edges (and dimensions the rollups do not
    keep) from call rows."""
    if hi <= lo:
        return []
    if by in CALL_GROUPS:
        return [("calls", lo, hi)]
    a = -(-int(lo) // BUCKET_SECONDS) * BUCKET_SECONDS
    b = int(hi) // BUCKET_SECONDS * BUCKET_SECONDS
    if a >= b:
        return [("calls", lo, hi)]
    pieces = [("rollups", float(a), float(b))]
    if lo < a:
        pieces.append(("calls", lo, float(a)))
    if b < hi:
        pieces.append(("calls", float(b), hi))
    return pieces


async def _collect(
    storage: Storage,
    calendar: Calendar,
    kind: str,
    lo: float,
    hi: float,
    by: str,
    window: str | None,
    agent: str | None,
    rows: dict[tuple[str, float | None], ReportRow],
) -> None:
    async def fetch(a: float, b: float, grouping: Grouping | None) -> list[AggRow]:
        if kind == "rollups":
            return await storage.aggregate_rollups(int(a), int(b), by, agent, grouping)
        return await storage.aggregate_calls(a, b, by, agent, grouping)

    if window is None:
        for part in await fetch(lo, hi, None):
            _merge(rows, part.key, None, part.totals)
        return
    for seg_lo, seg_hi, offset in offset_segments(calendar, lo, hi):
        grouping = grouping_for(window, offset)
        for part in await fetch(seg_lo, seg_hi, grouping):
            assert part.window is not None
            # A moment surely inside this part's calendar window: its fixed-width start,
            # or the segment's start when the window began under another offset.
            inside = max(part.window * grouping.width - grouping.shift, seg_lo)
            _merge(rows, part.key, calendar.window_start(window, inside), part.totals)


def _merge(
    rows: dict[tuple[str, float | None], ReportRow], key: str, start: float | None, totals: Totals
) -> None:
    row = rows.get((key, start))
    if row is None:
        row = rows[(key, start)] = ReportRow(key, start)
    row.totals.add(totals)
