"""The storage interface and the SQL shared by every engine. The only place with SQL.

Everything above this layer (ledger writer, budgets, reports, admin API, dashboard) talks
to `Storage` and does not know which engine is below.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, NamedTuple

from proxy.records import CallRecord
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.rollups import CALL_SUMS, KEY_EXPRESSIONS, ROLLUPS, SUMS

BUCKET_SECONDS = 900
GROUPS = ("agent", "intent", "model", "upstream", "provider", "user", "tag")
# Report dimensions the rollups do not keep: read from call rows (within retention).
CALL_GROUPS = frozenset({"intent", "provider", "user", "tag"})


class StorageError(Exception):
    """The database cannot be opened or used; `str()` says which and why."""


class StorageUnavailable(StorageError):
    """The database cannot be reached right now (down, restarting, network): the caller
    falls back (fail closed or open, spool) and the engine reconnects by itself."""


# Per-minute spend counters (spend rates, runway) are read over at most an hour: kept two.
MINUTE_COUNTERS_KEEP_SECONDS = 7200


class CounterKey(NamedTuple):
    """One shared budget counter: a scope (`agent:NAME`, `global`, `intent:ID`), what it
    counts (`cost:day`, `requests:minute`, `intents:hour`, `cost:life`...) and its window.

    A named tuple rather than a frozen dataclass: every admission hashes and compares
    dozens of keys, and a tuple does both in C (a dataclass's `__hash__` is Python)."""

    scope: str
    kind: str
    start: float
    end: float


# The budget counters a ledger row's cost goes to (shared budgets count spend as rows commit).
SpendKeys = Callable[[CallRecord], Sequence[CounterKey]]


@dataclass
class BudgetView:
    """Shared budget state as one decision sees it: the counters it reads, the agent's
    pause, and (for an admission) which counters it created and the loop guard's count."""

    counters: dict[CounterKey, list[int]]  # [used, reserved]
    paused: bool
    paused_reason: str | None
    new_keys: set[CounterKey]  # counters that did not exist before this admission
    loop_seen: int  # identical requests already in the loop guard's window


@dataclass(slots=True)
class Totals:
    requests: int = 0
    llm_calls: int = 0
    refused: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    cost_micro: int = 0  # whole micro-USD...
    cost_pico_rem: int = 0  # ...plus pico-USD: two sums that cannot overflow (see rollups)
    unpriced: int = 0
    shadowed: int = 0

    @property
    def cost_pico(self) -> int:
        return self.cost_micro * 1_000_000 + self.cost_pico_rem

    def add(self, other: Totals) -> None:
        for f in _TOTAL_FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))


_TOTAL_FIELDS = tuple(f.name for f in fields(Totals))
assert _TOTAL_FIELDS == SUMS


@dataclass(frozen=True, slots=True)
class Grouping:
    """Windows of `width` seconds, shifted: a moment t falls in window (t + shift) // width.
    Calendar windows are fixed-width only while the UTC offset is constant: the report layer
    asks per stretch of constant offset and maps the indexes back to calendar windows."""

    shift: int
    width: int


@dataclass(slots=True)
class AggRow:
    key: str
    window: int | None  # the window index under the Grouping asked for; None when not split
    totals: Totals = field(default_factory=Totals)


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


@dataclass(slots=True)
class IntentRow:
    intent: str
    agent: str
    first_seen: float
    last_seen: float
    requests: int
    llm_calls: int
    input_tokens: int
    output_tokens: int
    cost_pico: int
    unpriced: int


def exact_cost(micro: Any, rem: Any) -> int:
    """A cost summed as micro-USD and pico-USD remainder (see rollups), joined again."""
    return _int(micro) * 1_000_000 + _int(rem)


CALL_COLUMNS = CallRecord.columns()
INSERT_CALL = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in CALL_COLUMNS)}) ON CONFLICT (id) DO NOTHING"
)
_ROLLUP_KEYS = {"agent": "agent", "model": "model", "upstream": "upstream"}
assert set(_ROLLUP_KEYS) == {k for keys in ROLLUPS.values() for k in keys}


@cache
def numbered_params(sql: str) -> str:
    """`?` placeholders -> `$1, $2...` (PostgreSQL); SQL here never has `?` in literals."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class Storage(ABC):
    """One ledger, one set of named migrations, on any engine."""

    dialect: str = ""
    # True when budget counters live in the database and are shared by replicas.
    shared: bool = False
    # True when rollups are counted in each write's own transaction (no progress mark).
    rollups_inline: bool = False

    def __init__(self, url: str) -> None:
        self.url = url
        self._tasks: set[asyncio.Future[None]] = set()

    # -- engine primitives -------------------------------------------------------------

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self, grace: float = 10.0) -> None: ...

    @abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read with the reader connection(s)."""

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write in its own transaction; returns the number of rows changed."""

    @abstractmethod
    async def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Many rows in one transaction, one commit (the group commit)."""

    @abstractmethod
    async def run_script(self, statements: Sequence[str]) -> None:
        """DDL in one transaction (migrations)."""

    # -- migrations -------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        await self.run_script(
            [
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            ]
        )
        done = {row[0] for row in await self.fetch("SELECT name FROM _migrations")}
        applied = []
        for name, migration in MIGRATIONS:
            if name in done:
                continue
            record = f"INSERT INTO _migrations (name, applied_at) VALUES ('{name}', {time.time()})"
            await self.run_script([*migration(self.dialect), record])
            applied.append(name)
        return applied

    # -- ledger -----------------------------------------------------------------------

    @abstractmethod
    async def write_calls(
        self, records: Sequence[CallRecord], spend_keys: SpendKeys | None = None
    ) -> None:
        """Insert call rows and add them to the rollups, in one transaction. A row whose id
        is already stored is skipped, and not counted again. With `spend_keys`, engines
        that keep budget counters add each row's cost to its counters in the same
        transaction."""

    def write_calls_then(
        self,
        records: Sequence[CallRecord],
        done: Callable[[BaseException | None], None],
        spend_keys: SpendKeys | None = None,
    ) -> None:
        """`write_calls`, then `done(error or None)` on the event loop, without the caller
        waiting: the ledger writer's path. Engines may do it with fewer loop trips."""
        task = asyncio.ensure_future(self.write_calls(records, spend_keys))

        def finished(t: asyncio.Future[None]) -> None:
            done(t.exception() if not t.cancelled() else asyncio.CancelledError())

        task.add_done_callback(finished)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def is_permanent(self, error: BaseException) -> bool:
        """Whether writing a row failed for a reason retrying cannot fix (a value the column
        cannot hold, a constraint), as opposed to the database being busy or away."""
        return isinstance(error, (OverflowError, TypeError, ValueError))

    async def quarantine(self, entries: Sequence[tuple[CallRecord, str]], now: float) -> None:
        """Rows that cannot be stored, set aside whole (as JSON text, which holds any value)
        in the `quarantine` table, where they can be inspected and repaired."""
        await self.insert_many(
            "INSERT INTO quarantine (id, at, error, row_json) VALUES (?, ?, ?, ?)",
            [(r.id, now, error, json.dumps(r.as_row())) for r, error in entries],
        )

    async def quarantined(self) -> list[dict[str, Any]]:
        rows = await self.fetch("SELECT id, at, error, row_json FROM quarantine ORDER BY at")
        return [
            {"id": i, "at": float(at), "error": e, "row": json.loads(r)} for i, at, e, r in rows
        ]

    async def recent_calls(self, limit: int, agent: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE agent = ?", [agent]) if agent else ("", [])
        rows = await self.fetch(
            f"SELECT {', '.join(CALL_COLUMNS)} FROM calls {where} ORDER BY started_at DESC LIMIT ?",
            [*params, limit],
        )
        return [dict(zip(CALL_COLUMNS, row, strict=True)) for row in rows]

    async def call(self, call_id: str) -> dict[str, Any] | None:
        rows = await self.fetch(
            f"SELECT {', '.join(CALL_COLUMNS)} FROM calls WHERE id = ?", [call_id]
        )
        return dict(zip(CALL_COLUMNS, rows[0], strict=True)) if rows else None

    async def count_calls(self) -> int:
        return int((await self.fetch("SELECT COUNT(*) FROM calls"))[0][0])

    async def prune_calls(self, before: float) -> int:
        """Delete call rows older than `before` (once rolled up); rollups and intent totals
        stay."""
        await self.sync_rollups()
        if self.rollups_inline:
            return await self.execute("DELETE FROM calls WHERE started_at < ?", [before])
        return await self.execute(
            "DELETE FROM calls WHERE started_at < ? AND seq <= "
            "(SELECT seq FROM rollup_progress WHERE name = 'calls')",
            [before],
        )

    async def start(self) -> None:
        """After migrations: background upkeep, if the engine has any."""
        return None

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers."""
        return None

    async def sync_rollups(self) -> None:
        """Bring rollups and intent totals up to the last committed call row. Engines that
        keep them in the rows' own transaction have nothing to do."""
        return None

    # -- aggregates -------------------------------------------------------------------

    async def aggregate_rollups(
        self, since: int, until: int, group: str, agent: str | None, grouping: Grouping | None
    ) -> list[AggRow]:
        """Sums from the 15-minute rollups over [since, until), both bucket-aligned."""
        table = "rollup_15m" if agent is not None else f"rollup_{group}_15m"
        key = _ROLLUP_KEYS[group]
        window = f"(bucket + {grouping.shift}) / {grouping.width}" if grouping else "NULL"
        sums = ", ".join(f"SUM({c})" for c in _TOTAL_FIELDS)
        return await self._aggregate(
            f"SELECT {key}, {window}, {sums} FROM {table} WHERE bucket >= ? AND bucket < ?",
            [since, until],
            key,
            agent,
            grouping is not None,
        )

    async def aggregate_calls(
        self, since: float, until: float, group: str, agent: str | None, grouping: Grouping | None
    ) -> list[AggRow]:
        """Sums straight from call rows over [since, until) (any alignment, any group)."""
        key = KEY_EXPRESSIONS[group]
        window = self.window_expr("started_at", grouping) if grouping else "NULL"
        return await self._aggregate(
            f"SELECT {key}, {window}, {', '.join(CALL_SUMS)} FROM calls "
            "WHERE started_at >= ? AND started_at < ?",
            [since, until],
            key,
            agent,
            grouping is not None,
        )

    async def _aggregate(
        self, sql: str, params: list[Any], key: str, agent: str | None, windowed: bool
    ) -> list[AggRow]:
        if agent is not None:
            sql += " AND agent = ?"
            params.append(agent)
        sql += f" GROUP BY {key}" + (", 2" if windowed else "")
        return [
            AggRow(row[0], int(row[1]) if row[1] is not None else None, Totals(*map(_int, row[2:])))
            for row in await self.fetch(sql, params)
        ]

    def window_expr(self, column: str, grouping: Grouping) -> str:
        return f"CAST(({column} + {grouping.shift}) / {grouping.width} AS INTEGER)"

    async def time_span(self, source: str) -> tuple[float, float] | None:
        """First and last moment with data: in the rollups or in the call rows."""
        if source == "calls":
            sql = "SELECT MIN(started_at), MAX(started_at) FROM calls"
        else:
            sql = "SELECT MIN(bucket), MAX(bucket) + 900 FROM rollup_agent_15m"
        lo, hi = (await self.fetch(sql))[0]
        return None if lo is None else (float(lo), float(hi))

    # -- budget state rebuilt after a restart -----------------------------------------

    async def cost_by_agent_since(self, since: int) -> dict[str, int]:
        """Spend per agent from bucket-aligned `since` (window starts are aligned)."""
        rows = await self.fetch(
            "SELECT agent, SUM(cost_micro), SUM(cost_pico_rem) FROM rollup_agent_15m"
            " WHERE bucket >= ? GROUP BY agent",
            [since],
        )
        return {agent: exact_cost(micro, rem) for agent, micro, rem in rows}

    async def cost_by_minute_since(self, since: float) -> list[tuple[str, float, int]]:
        """(agent, minute start, pico-USD) from the call rows: spend rates after a restart."""
        minute = self.window_expr("started_at", Grouping(0, 60))
        rows = await self.fetch(
            f"SELECT agent, {minute}, SUM(cost_pico / 1000000), SUM(cost_pico % 1000000)"
            " FROM calls WHERE started_at >= ? AND cost_pico > 0 GROUP BY 1, 2",
            [since],
        )  # two sums that cannot overflow 64 bits (see rollups)
        return [(agent, float(m) * 60, exact_cost(micro, rem)) for agent, m, micro, rem in rows]

    async def rollup_buckets(self, agent: str, since: float) -> list[tuple[float, int]]:
        """(bucket start, pico-USD) of one agent's spend since `since`, from the rollups."""
        await self.sync_rollups()
        rows = await self.fetch(
            "SELECT bucket, cost_micro, cost_pico_rem FROM rollup_agent_15m"
            " WHERE agent = ? AND bucket >= ?",
            [agent, int(since)],
        )
        return [(float(b), exact_cost(micro, rem)) for b, micro, rem in rows]

    async def requests_by_agent_since(self, since: float) -> dict[str, int]:
        rows = await self.fetch(
            "SELECT agent, COUNT(*) FROM calls WHERE started_at >= ? AND refused = 0 "
            "AND usage_source <> 'reported' GROUP BY agent",
            [since],
        )
        return {agent: int(n) for agent, n in rows}

    async def intents_started_since(self, since: float) -> dict[str, int]:
        rows = await self.fetch(
            "SELECT agent, COUNT(*) FROM intents WHERE first_seen >= ? GROUP BY agent", [since]
        )
        return {agent: int(n) for agent, n in rows}

    async def intents_named(self, intent: str, agent: str | None = None) -> list[IntentRow]:
        """The lifetime totals of an intent id: one per agent that used it (intents live in
        their agent's lane), or only `agent`'s."""
        where, params = ("intent = ? AND agent = ?", [intent, agent]) if agent else (
            "intent = ?", [intent])  # fmt: skip
        rows = await self.fetch(
            "SELECT intent, agent, first_seen, last_seen, requests, llm_calls, input_tokens, "
            f"output_tokens, cost_micro, cost_pico_rem, unpriced FROM intents WHERE {where}"
            " ORDER BY agent",
            params,
        )
        return [
            IntentRow(
                r[0],
                r[1],
                float(r[2]),
                float(r[3]),
                int(r[4]),
                int(r[5]),
                int(r[6]),
                int(r[7]),
                exact_cost(r[8], r[9]),
                int(r[10]),
            )
            for r in rows
        ]

    async def intent(self, agent: str, intent: str) -> IntentRow | None:
        rows = await self.intents_named(intent, agent)
        return rows[0] if rows else None

    async def agent_seen(self, agent: str) -> bool:
        """Whether the ledger holds any call of the agent (the rollups keep every agent
        that ever called, retention or not)."""
        rows = await self.fetch("SELECT 1 FROM rollup_agent_15m WHERE agent = ? LIMIT 1", [agent])
        return bool(rows)

    async def all_agents(self) -> list[str]:
        rows = await self.fetch("SELECT DISTINCT agent FROM rollup_agent_15m ORDER BY agent")
        return [r[0] for r in rows]

    async def user_cost_since(self, agent: str, user: str, start: float, end: float) -> int:
        """What one end user of an agent spent in [start, end), from the call rows."""
        rows = await self.fetch(
            "SELECT SUM(cost_pico / 1000000), SUM(cost_pico % 1000000) FROM calls"
            " WHERE agent = ? AND end_user = ? AND started_at >= ? AND started_at < ?",
            [agent, user, start, end],
        )
        return exact_cost(rows[0][0] or 0, rows[0][1] or 0) if rows else 0

    async def agents_since(self, since: int) -> list[str]:
        rows = await self.fetch(
            "SELECT DISTINCT agent FROM rollup_15m WHERE bucket >= ? ORDER BY agent", [since]
        )
        return [r[0] for r in rows]

    # -- policies and pauses ----------------------------------------------------------

    async def policies(self) -> dict[str, str]:
        return {a: p for a, p in await self.fetch("SELECT agent, policy FROM policies")}

    async def put_policy(self, agent: str, policy_json: str, now: float) -> None:
        await self.execute(
            "INSERT INTO policies (agent, policy, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (agent) DO UPDATE SET policy = excluded.policy, "
            "updated_at = excluded.updated_at",
            [agent, policy_json, now],
        )

    async def delete_policy(self, agent: str) -> bool:
        return await self.execute("DELETE FROM policies WHERE agent = ?", [agent]) > 0

    async def paused_agents(self) -> dict[str, str | None]:
        rows = await self.fetch("SELECT agent, reason FROM agent_state WHERE paused = 1")
        return {a: r for a, r in rows}

    async def set_paused(self, agent: str, paused: bool, reason: str | None, now: float) -> None:
        await self.execute(
            "INSERT INTO agent_state (agent, paused, reason, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (agent) DO UPDATE SET paused = excluded.paused, "
            "reason = excluded.reason, updated_at = excluded.updated_at",
            [agent, int(paused), reason, now],
        )
