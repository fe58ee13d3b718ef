"""What a task was worth: intents closed with an outcome, and cost per outcome.

An intent is closed by a header on its last call (`X-Intent-Outcome`), a heartbeat's
`status`, or `POST /meter/intents/{intent}/outcome`. Until then it is `open`. Reports
set the spend of succeeded intents against their number: what one success costs, per
agent or model. Progress (a heartbeat with `status: progress`, or any outcome) also
marks how much the intent had spent, for `max_cost_per_intent_without_progress_usd`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from proxy.money import usd_exact, usd_sig
from proxy.storage import Storage
from proxy.storage.outcomes import outcome_of, outcome_totals, set_progress

OUTCOMES = ("success", "failure", "abandoned")
COLUMNS = (*OUTCOMES, "open")
HEADER = "X-Intent-Outcome"


def parse_outcome(value: object) -> str | None:
    """The outcome named, or None when it is not one (the caller says what is allowed)."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in OUTCOMES else None


@dataclass
class OutcomeRow:
    key: str
    intents: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    cost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    unpriced: int = 0

    @property
    def total_pico(self) -> int:
        return sum(self.cost.values())

    @property
    def per_success_pico(self) -> int | None:
        """Spend on succeeded intents per succeeded intent, rounded to the pico-USD."""
        n = self.intents["success"]
        return None if n == 0 else (self.cost["success"] * 2 + n) // (2 * n)

    def to_json(self, by: str) -> dict[str, Any]:
        out: dict[str, Any] = {by: self.key}
        for name in COLUMNS:
            out[f"{name}_intents"] = self.intents[name]
            out[f"{name}_cost_usd"] = usd_exact(self.cost[name])
        per = self.per_success_pico
        out["cost_usd"] = usd_exact(self.total_pico)
        out["cost_per_success_usd"] = usd_exact(per) if per is not None else None
        out["unpriced"] = self.unpriced
        return out


@dataclass
class OutcomeReport:
    by: str
    rows: list[OutcomeRow]
    total: OutcomeRow

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "rows": [r.to_json(self.by) for r in self.rows],
                "total": self.total.to_json(self.by)}  # fmt: skip

    def to_csv(self) -> str:
        buf = io.StringIO()
        rows = [r.to_json(self.by) for r in self.rows] + [self.total.to_json(self.by)]
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def to_table(self) -> str:
        head = [self.by.upper(), "SUCCESS", "FAILURE", "ABANDONED", "OPEN", "COST_USD",
                "ON_SUCCESS", "PER_SUCCESS"]  # fmt: skip
        all_rows = [*self.rows, self.total]
        money = usd_sig(*(v for r in all_rows for v in (r.total_pico, r.cost["success"],
                                                        r.per_success_pico or 0)),
                        significant=3, min_places=2)  # fmt: skip
        lines = []
        for i, r in enumerate(all_rows):
            total, success, per = money[3 * i : 3 * i + 3]
            lines.append([r.key if r is not self.total else "TOTAL",
                          *(str(r.intents[c]) for c in COLUMNS), total, success,
                          per if r.per_success_pico is not None else "-"])  # fmt: skip
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

        def fmt(cells: list[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(head), rule, *(fmt(x) for x in lines[:-1]), rule, fmt(lines[-1]),
                          "(intents by outcome; cost of their calls; PER_SUCCESS = spend on"
                          " succeeded intents / succeeded intents)"])  # fmt: skip


async def outcome_report(
    storage: Storage, by: str, since: float | None, until: float | None, agent: str | None
) -> OutcomeReport:
    if by not in ("agent", "model"):
        from proxy.reports import ReportError

        raise ReportError("by", f"outcomes are reported by agent or model, not {by!r}")
    await storage.sync_rollups()
    rows: dict[str, OutcomeRow] = {}
    total = OutcomeRow("TOTAL")
    for key, outcome, intents, micro, rem, unpriced in await outcome_totals(
        storage, by, since, until, agent
    ):
        row = rows.setdefault(key, OutcomeRow(key))
        cost = micro * 1_000_000 + rem
        for r in (row, total):
            r.intents[outcome] = r.intents.get(outcome, 0) + intents
            r.cost[outcome] = r.cost.get(outcome, 0) + cost
            r.unpriced += unpriced
    ordered = sorted(rows.values(), key=lambda r: (-r.total_pico, r.key))
    return OutcomeReport(by, ordered, total)


class ProgressBook:
    """What each intent had spent at its last progress report (0: none yet), for
    `max_cost_per_intent_without_progress_usd`. Kept in the ledger's database; read once
    per intent, and again after `ttl` seconds when replicas share it (a progress report
    may reach another replica)."""

    def __init__(self, storage: Storage | None, ttl: float | None = None) -> None:
        self.storage = storage
        self.ttl = ttl
        self._marks: dict[tuple[str, str], tuple[int, float]] = {}

    def known(self, agent: str, intent: str) -> int:
        """The mark as last read (0 before the first read): a hint, without waiting."""
        known = self._marks.get((agent, intent))
        return known[0] if known is not None else 0

    async def mark(self, agent: str, intent: str, now: float) -> int:
        key = (agent, intent)
        known = self._marks.get(key)
        if known is not None and (self.ttl is None or now - known[1] < self.ttl):
            return known[0]
        spent = 0
        if self.storage is not None:
            row = await outcome_of(self.storage, agent, intent)
            spent = int(row["progress_spent_pico"] or 0) if row else 0
        if len(self._marks) > 200_000:
            self._marks.clear()
        self._marks[key] = (spent, now)
        return spent

    async def spent(self, agent: str, intent: str) -> int:
        """The intent's lifetime spend as the ledger has it."""
        if self.storage is None:
            return 0
        await self.storage.sync_rollups()
        row = await self.storage.intent(agent, intent)
        return row.cost_pico if row is not None else 0

    async def progressed(self, agent: str, intent: str, spent: int, now: float) -> None:
        self._marks[(agent, intent)] = (spent, now)
        if self.storage is not None:
            await set_progress(self.storage, agent, intent, spent, now)
