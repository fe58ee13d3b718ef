"""PostgreSQL through asyncpg: the engine for several replicas sharing one ledger and one
set of budgets.

Same schema and migrations as SQLite. Rollups are counted in each write's own
transaction (replicas commit concurrently, so a progress mark would skip rows committed
out of order).

Budgets: admission is one transaction per call. The counters it reads are locked
(`SELECT ... FOR UPDATE`, in key order, so two admissions never deadlock), the pure
decision runs on them, and the new values, the reservation (a lease named by the call's
ledger id) and any pause are written before the commit: check and reserve are one atomic
step across every replica. The ledger write of a call does the rest in its own
transaction: it adds the call's cost to every counter of its windows and releases its
lease. A row replayed from a spool (same id) is skipped, so neither is done twice.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from proxy.records import CallRecord
from proxy.storage.base import (
    CALL_COLUMNS,
    BudgetView,
    CounterKey,
    Grouping,
    Storage,
    StorageError,
    StorageUnavailable,
    numbered_params,
)
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.rollups import rollup_statements

T = TypeVar("T")
_PG_TYPES = {
    "id": "text", "started_at": "float8", "ended_at": "float8", "agent": "text",
    "intent": "text", "upstream": "text", "endpoint": "text", "method": "text",
    "model_requested": "text", "model_served": "text", "model_priced": "text",
    "status": "int4", "stream": "int4", "input_tokens": "int8", "cached_input_tokens": "int8",
    "output_tokens": "int8", "reasoning_tokens": "int8", "cache_write_tokens": "int8",
    "cost_pico": "int8", "usage_source": "text", "service_tier": "text",
    "price_version": "text", "latency_ms": "float8", "ttfb_ms": "float8", "error": "text",
    "llm_calls": "int4", "refused": "int4", "reserved_pico": "int8",
}  # fmt: skip
assert set(_PG_TYPES) == set(CALL_COLUMNS)
_INSERT_CALLS = (
    f"INSERT INTO calls ({', '.join(CALL_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_PG_TYPES[c]}[]" for i, c in enumerate(CALL_COLUMNS, 1))
    + ") ON CONFLICT (id) DO NOTHING RETURNING seq, id, agent, intent, started_at, cost_pico"
)
_UPSERT_COUNTERS = (
    "INSERT INTO budget_counters (scope, kind, window_start, window_end, used, reserved)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::int8[],"
    " $6::int8[]) ORDER BY 1, 2, 3 ON CONFLICT (scope, kind, window_start) DO UPDATE"
    " SET used = budget_counters.used + excluded.used,"
    " reserved = budget_counters.reserved + excluded.reserved"
)
_ROLLUP = [numbered_params(s) for s in rollup_statements("postgresql", "seq = ANY(?::bigint[])")]
_LOCK_MIGRATIONS = 7_361_220_001  # pg_advisory_xact_lock key: one replica migrates at a time
_RETRIES = 5  # a transaction that lost a deadlock (or a serialization race) runs again
_RETRYABLE = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
# Errors that mean "cannot reach the database now", as opposed to a bad statement.
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


def redact(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _key_order(k: CounterKey) -> tuple[str, str, float]:
    return (k.scope, k.kind, k.start)


def _keys(rows: Sequence[CounterKey]) -> tuple[list[str], list[str], list[float], list[float]]:
    return (
        [k.scope for k in rows],
        [k.kind for k in rows],
        [k.start for k in rows],
        [k.end for k in rows],
    )


class PostgresStorage(Storage):
    dialect = "postgresql"
    shared = True
    rollups_inline = True

    # No floor of idle connections: asyncpg would log a traceback each time it failed to
    # restore one during an outage. Connections opened under load stay open.
    def __init__(self, url: str, *, min_size: int = 0, max_size: int = 16) -> None:
        super().__init__(url)
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        # Which replica's leases are whose (set by the shared enforcer).
        self.replica = "replica"
        # The counters a call's cost goes to, from (agent, intent, started_at): set by the
        # shared enforcer, which knows the calendar. None: budgets are not kept here.
        self.spend_keys: Callable[[str, str | None, float], Sequence[CounterKey]] | None = None

    # -- connections ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                dsn=self.url, min_size=self.min_size, max_size=self.max_size,
                timeout=10, command_timeout=30,
            )  # fmt: skip
        except _UNREACHABLE as e:
            raise StorageUnavailable(f"{redact(self.url)}: cannot connect: {e}") from None
        except asyncpg.PostgresError as e:
            raise StorageError(f"{redact(self.url)}: {e}") from None

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10)
            except (TimeoutError, *_UNREACHABLE):
                self._pool.terminate()
            self._pool = None

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError(f"{redact(self.url)}: the database is not open")
        return self._pool

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run `work(connection)` in a transaction; unreachable-database errors become
        StorageUnavailable (the pool reconnects on the next call). `work` may run more
        than once: a transaction that lost a deadlock is run again."""
        for attempt in range(_RETRIES):
            try:
                async with self._p().acquire(timeout=10) as conn, conn.transaction():
                    return await work(conn)
            except _RETRYABLE:
                if attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.001 * 2**attempt)
            except _UNREACHABLE as e:
                raise StorageUnavailable(f"{redact(self.url)}: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    # -- primitives -----------------------------------------------------------------------

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows = await self._run(lambda c: c.fetch(numbered_params(sql), *params))
        return [tuple(r) for r in rows]

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status = await self._run(lambda c: c.execute(numbered_params(sql), *params))
        tail = str(status).rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._run(lambda c: c.executemany(numbered_params(sql), rows))

    async def run_script(self, statements: Sequence[str]) -> None:
        async def work(conn: asyncpg.Connection) -> None:
            for statement in statements:
                await conn.execute(statement)

        await self._run(work)

    async def migrate(self) -> list[str]:
        """All under one advisory lock: replicas starting together migrate once."""

        async def work(conn: asyncpg.Connection) -> list[str]:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_MIGRATIONS)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {r[0] for r in await conn.fetch("SELECT name FROM _migrations")}
            applied = []
            for name, migration in MIGRATIONS:
                if name in done:
                    continue
                for statement in migration(self.dialect):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO _migrations (name, applied_at)"
                    " VALUES ($1, extract(epoch from now()))",
                    name,
                )
                applied.append(name)
            return applied

        applied: list[str] = await self._run(work)
        return applied

    def window_expr(self, column: str, grouping: Grouping) -> str:
        return f"CAST(floor(({column} + {grouping.shift}) / {grouping.width}) AS BIGINT)"

    # -- the ledger -----------------------------------------------------------------------

    async def write_calls(self, records: Sequence[CallRecord]) -> None:
        rows = [r.as_row() for r in records]
        columns = [list(col) for col in zip(*rows, strict=True)] if rows else []

        async def work(conn: asyncpg.Connection) -> None:
            inserted = await conn.fetch(_INSERT_CALLS, *columns)
            if not inserted:  # a replayed row (same id) is skipped, and not counted again
                return
            seqs = [r[0] for r in inserted]
            for statement in _ROLLUP:
                await conn.execute(statement, seqs)
            if self.spend_keys is not None:
                await self._settle(conn, inserted)

        await self._run(work)

    async def _settle(self, conn: asyncpg.Connection, inserted: list[asyncpg.Record]) -> None:
        """The calls' costs onto their counters and their reservations released, with the
        rows themselves: a call's spend is counted exactly when its row is."""
        assert self.spend_keys is not None
        deltas: dict[CounterKey, list[int]] = {}
        leases = await conn.fetch(
            "DELETE FROM reservations WHERE id = ANY($1::text[]) RETURNING amount, counters",
            [r[1] for r in inserted],
        )
        for amount, counters in leases:
            for key in _load(counters):
                deltas.setdefault(key, [0, 0])[1] -= amount
        for _, _, agent, intent, started_at, cost in inserted:
            if cost:
                for key in self.spend_keys(agent, intent, started_at):
                    deltas.setdefault(key, [0, 0])[0] += cost
        if deltas:
            ordered = sorted(deltas, key=_key_order)
            await conn.execute(
                _UPSERT_COUNTERS,
                *_keys(ordered),
                [deltas[k][0] for k in ordered],
                [deltas[k][1] for k in ordered],
            )

    # -- shared budgets -------------------------------------------------------------------

    async def budget_admit(
        self,
        keys: Sequence[CounterKey],
        agent: str,
        loop: tuple[str, str, str, float] | None,
        now: float,
        decide: Callable[[BudgetView], T],
    ) -> T:
        ordered = sorted(set(keys), key=_key_order)

        async def work(conn: asyncpg.Connection) -> T:
            created = await conn.fetch(
                "INSERT INTO budget_counters"
                " (scope, kind, window_start, window_end, used, reserved) SELECT s, k, w, e, 0, 0"
                " FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[])"
                " AS t(s, k, w, e) ORDER BY s, k, w"
                " ON CONFLICT DO NOTHING RETURNING scope, kind, window_start",
                *_keys(ordered),
            )
            rows = await conn.fetch(
                "SELECT scope, kind, window_start, window_end, used, reserved FROM budget_counters"
                " WHERE (scope, kind, window_start) IN (SELECT * FROM unnest($1::text[],"
                " $2::text[], $3::float8[])) ORDER BY scope, kind, window_start FOR UPDATE",
                *_keys(ordered)[:3],
            )
            paused = await conn.fetchrow(
                "SELECT reason FROM agent_state WHERE agent = $1 AND paused = 1", agent
            )
            seen = 0
            if loop is not None:
                a, i, digest, window = loop
                seen = await conn.fetchval(
                    "SELECT count(*) FROM loop_hits WHERE agent = $1 AND intent = $2"
                    " AND digest = $3 AND at > $4",
                    a, i, digest, now - window,
                )  # fmt: skip
            new = {(r[0], r[1], r[2]) for r in created}
            for scope, kind, _ in new:
                if scope.startswith("intent:"):
                    # An intent first seen by the counters (or pruned from them) may have
                    # older calls in the ledger: its lifetime spend starts from theirs.
                    await conn.execute(
                        "UPDATE budget_counters SET used = COALESCE((SELECT cost_pico FROM"
                        " intents WHERE intent = $2), 0) WHERE scope = $1 AND kind = $3",
                        scope, scope[len("intent:"):], kind,
                    )  # fmt: skip
            view = BudgetView(
                counters={CounterKey(r[0], r[1], r[2], r[3]): [r[4], r[5]] for r in rows},
                paused=paused is not None,
                paused_reason=paused[0] if paused is not None else None,
                new_keys={k for k in ordered if (k.scope, k.kind, k.start) in new},
                loop_seen=int(seen),
            )
            before = {k: tuple(v) for k, v in view.counters.items()}
            result = decide(view)
            changed = [k for k, v in view.counters.items() if tuple(v) != before[k]]
            if changed:
                await conn.executemany(
                    "UPDATE budget_counters SET used = $4, reserved = $5"
                    " WHERE scope = $1 AND kind = $2 AND window_start = $3",
                    [(k.scope, k.kind, k.start, *view.counters[k]) for k in changed],
                )
            if view.lease is not None:
                lease, amount, counters = view.lease
                await conn.execute(
                    "INSERT INTO reservations (id, replica, created, amount, counters)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    lease, self.replica, now, amount, _dump(counters),
                )  # fmt: skip
            if view.loop_hit is not None:
                await conn.execute(
                    "INSERT INTO loop_hits (agent, intent, digest, at) VALUES ($1, $2, $3, $4)",
                    *view.loop_hit, now,
                )  # fmt: skip
            if view.pause_reason is not None:
                await conn.execute(
                    "INSERT INTO agent_state (agent, paused, reason, updated_at)"
                    " VALUES ($1, 1, $2, $3) ON CONFLICT (agent) DO UPDATE SET paused = 1,"
                    " reason = excluded.reason, updated_at = excluded.updated_at",
                    agent, view.pause_reason, now,
                )  # fmt: skip
            return result

        result: T = await self._run(work)
        return result

    async def budget_counters(self, now: float) -> list[tuple[CounterKey, int, int]]:
        rows = await self.fetch(
            "SELECT scope, kind, window_start, window_end, used, reserved FROM budget_counters"
            " WHERE window_end > ? AND scope NOT LIKE 'intent:%'",
            [now],
        )
        return [(CounterKey(r[0], r[1], r[2], r[3]), int(r[4]), int(r[5])) for r in rows]

    async def agent_paused(self, agent: str) -> tuple[bool, str | None]:
        """One read, no transaction: the admission of an agent no limit applies to."""
        try:
            row = await self._p().fetchrow(
                "SELECT reason FROM agent_state WHERE agent = $1 AND paused = 1", agent,
                timeout=10,
            )  # fmt: skip
        except _UNREACHABLE as e:
            raise StorageUnavailable(f"{redact(self.url)}: {type(e).__name__}: {e}") from None
        return (True, row[0]) if row is not None else (False, None)

    async def upkeep(self, now: float, replica_ttl: float | None) -> int:
        """Heartbeat this replica; release the leases of replicas silent for `replica_ttl`
        (a crashed replica's reservations must not hold budget forever; None: release
        none); prune what no window uses."""

        async def work(conn: asyncpg.Connection) -> int:
            await conn.execute(
                "INSERT INTO replicas (id, last_seen) VALUES ($1, $2) ON CONFLICT (id)"
                " DO UPDATE SET last_seen = excluded.last_seen",
                self.replica, now,
            )  # fmt: skip
            dead = [] if replica_ttl is None else [r[0] for r in await conn.fetch(
                "SELECT id FROM replicas WHERE last_seen < $1 AND id <> $2 FOR UPDATE SKIP LOCKED",
                now - replica_ttl, self.replica,
            )]  # fmt: skip
            released = 0
            if dead:
                leases = await conn.fetch(
                    "DELETE FROM reservations WHERE replica = ANY($1::text[])"
                    " RETURNING amount, counters",
                    dead,
                )
                deltas: dict[CounterKey, int] = {}
                for amount, counters in leases:
                    for key in _load(counters):
                        deltas[key] = deltas.get(key, 0) + amount
                for key in sorted(deltas, key=_key_order):
                    await conn.execute(
                        "UPDATE budget_counters SET reserved = reserved - $4"
                        " WHERE scope = $1 AND kind = $2 AND window_start = $3",
                        key.scope, key.kind, key.start, deltas[key],
                    )  # fmt: skip
                await conn.execute("DELETE FROM replicas WHERE id = ANY($1::text[])", dead)
                released = len(leases)
            horizon = now - 40 * 86400
            await conn.execute(
                "DELETE FROM budget_counters WHERE window_end < $1 AND kind <> 'cost:life'",
                horizon,
            )
            # Intents idle that long: their lifetime spend stays in the ledger's intent
            # totals, where an admission finds it again (see budget_admit).
            await conn.execute(
                "DELETE FROM budget_counters b WHERE kind = 'cost:life' AND reserved = 0"
                " AND EXISTS (SELECT 1 FROM intents i WHERE b.scope = 'intent:' || i.intent"
                " AND i.last_seen < $1)",
                horizon,
            )
            await conn.execute("DELETE FROM loop_hits WHERE at < $1", now - 86400)
            await conn.execute("DELETE FROM alerts_sent WHERE at < $1", now - 40 * 86400)
            return released

        released: int = await self._run(work)
        return released

    async def claim_alert(self, key: str, now: float) -> bool:
        """True for the one replica that gets to send this alert."""
        rows = await self.fetch(
            "INSERT INTO alerts_sent (key, at) VALUES (?, ?) ON CONFLICT DO NOTHING RETURNING key",
            [key, now],
        )
        return bool(rows)


def _dump(keys: Sequence[CounterKey]) -> str:
    return json.dumps([[k.scope, k.kind, k.start, k.end] for k in keys])


def _load(text: str) -> list[CounterKey]:
    return [CounterKey(s, k, w, e) for s, k, w, e in json.loads(text)]
