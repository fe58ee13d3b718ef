"""PostgreSQL through asyncpg: the engine for several replicas sharing one ledger and one
set of budgets.

Same schema and migrations as SQLite. Rollups are counted in each write's own
transaction (replicas commit concurrently, so a progress mark would skip rows committed
out of order). Budgets: admissions are checked and reserved in the database, atomically,
by `meterproxy_admit`; a call's ledger row, written by `meterproxy_record`, adds its cost
to the counters and releases its reservation in the same transaction, so a row replayed
from a spool (same id) changes nothing. Both functions are in `pg_functions`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from proxy.records import CallRecord
from proxy.redact import redact_url
from proxy.storage.base import (
    MINUTE_COUNTERS_KEEP_SECONDS,
    BudgetView,
    CounterKey,
    Grouping,
    SpendKeys,
    Storage,
    StorageError,
    StorageUnavailable,
    numbered_params,
)
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.pg_functions import ADMIT_CALL, ADMIT_FUNCTION, RECORD_CALL, record_function

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


_ADMIT_BATCH = 500  # admissions per round trip, at most


@dataclass(frozen=True, slots=True)
class _AdmitRequest:
    replica: str
    agent: str
    changes: list[CounterChange]  # in key order
    intent: str | None
    lease: str | None
    amount: int
    loop: tuple[str, str, float, int | None] | None
    now: float


@dataclass(frozen=True, slots=True)
class CounterChange:
    """One counter in a one-round-trip admission (see _ADMIT_FUNCTION)."""

    key: CounterKey
    add_used: int
    add_reserved: int
    cap: int | None  # the most used + reserved may be before this call; None: no check
    new_only: bool = False  # counts a new intent: applies only if the intent is new


@dataclass(frozen=True, slots=True)
class AdmitResult:
    ok: bool
    new_intent: bool  # this admission created the intent's lifetime counter
    paused: bool
    paused_reason: str | None
    loop_seen: int
    counters: dict[CounterKey, tuple[int, int]]  # (used, reserved) after the admission


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool as they are: nothing here changes session state
    (locks are transaction-scoped), so asyncpg's reset query would be a wasted round trip
    per use."""


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
    def __init__(self, url: str, *, min_size: int = 0, max_size: int = 10) -> None:
        super().__init__(url)
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._admissions: list[tuple[_AdmitRequest, asyncio.Future[AdmitResult]]] = []
        self._admitting = False

    # -- connections ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                dsn=self.url, min_size=self.min_size, max_size=self.max_size,
                timeout=10, command_timeout=30, reset=_no_reset,
            )  # fmt: skip
        except _UNREACHABLE as e:
            raise StorageUnavailable(f"{redact_url(self.url)}: cannot connect: {e}") from None
        except asyncpg.PostgresError as e:
            raise StorageError(f"{redact_url(self.url)}: {e}") from None

    async def close(self, grace: float = 10.0) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), grace)
            except (TimeoutError, *_UNREACHABLE):
                self._pool.terminate()
            self._pool = None

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError(f"{redact_url(self.url)}: the database is not open")
        return self._pool

    async def _run(
        self, work: Callable[[asyncpg.Connection], Awaitable[Any]], *, transaction: bool = True
    ) -> Any:
        """Run `work(connection)`, in a transaction unless it is one statement (which is
        its own, with no BEGIN/COMMIT round trips). Unreachable-database errors become
        StorageUnavailable (the pool reconnects on the next call). `work` may run more
        than once: a transaction that lost a deadlock is run again."""
        for attempt in range(_RETRIES):
            try:
                async with self._p().acquire(timeout=10) as conn:
                    if not transaction:
                        return await work(conn)
                    async with conn.transaction():
                        return await work(conn)
            except _RETRYABLE:
                if attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.001 * 2**attempt)
            except _UNREACHABLE as e:
                raise StorageUnavailable(
                    f"{redact_url(self.url)}: {type(e).__name__}: {e}"
                ) from None
        raise AssertionError("unreachable")

    async def _statement(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One statement, one round trip, its own transaction."""
        rows: list[asyncpg.Record] = await self._run(
            lambda conn: conn.fetch(sql, *args), transaction=False
        )
        return rows

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    # -- primitives -----------------------------------------------------------------------

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows = await self._statement(numbered_params(sql), *params)
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
            # Functions are code: replaced at each start, to match this version.
            await conn.execute(ADMIT_FUNCTION)
            await conn.execute(record_function())
            return applied

        applied: list[str] = await self._run(work)
        return applied

    def is_permanent(self, error: BaseException) -> bool:
        return isinstance(error, (
            asyncpg.exceptions.DataError,  # out of range, bad text, NUL character...
            asyncpg.exceptions.IntegrityConstraintViolationError,
            asyncpg.exceptions.SyntaxOrAccessError,
        )) or super().is_permanent(error)  # fmt: skip

    def window_expr(self, column: str, grouping: Grouping) -> str:
        return f"CAST(floor(({column} + {grouping.shift}) / {grouping.width}) AS BIGINT)"

    # -- the ledger -----------------------------------------------------------------------

    async def write_calls(
        self, records: Sequence[CallRecord], spend_keys: SpendKeys | None = None
    ) -> None:
        if not records:
            return
        if len({r.id for r in records}) < len(records):  # a spool replayed twice, say
            records = list({r.id: r for r in reversed(records)}.values())[::-1]
        rows = [r.as_row() for r in records]
        columns = [list(col) for col in zip(*rows, strict=True)]
        spend: tuple[list[Any], ...] = ([], [], [], [], [], [])
        if spend_keys is not None:
            ids, scopes, kinds, starts, ends, costs = spend
            for r in records:
                if r.cost_pico:
                    for key in spend_keys(r):
                        ids.append(r.id)
                        scopes.append(key.scope)
                        kinds.append(key.kind)
                        starts.append(key.start)
                        ends.append(key.end)
                        costs.append(r.cost_pico)
        await self._statement(RECORD_CALL, *columns, *spend)

    # -- shared budgets -------------------------------------------------------------------

    async def admit_counters(
        self,
        replica: str,
        agent: str,
        changes: Sequence[CounterChange],
        intent: str | None,
        lease: tuple[str, int] | None,
        loop: tuple[str, str, float, int | None] | None,
        now: float,
    ) -> AdmitResult:
        """Check and reserve atomically. Admissions that arrive while a batch is at the
        database go together in the next one: one round trip for all of them."""
        ordered = sorted(changes, key=lambda c: _key_order(c.key))
        reserving = any(c.add_reserved for c in ordered)
        request = _AdmitRequest(
            replica, agent, ordered, intent, lease[0] if lease and reserving else None,
            lease[1] if lease else 0, loop, now,
        )  # fmt: skip
        future: asyncio.Future[AdmitResult] = asyncio.get_running_loop().create_future()
        self._admissions.append((request, future))
        if not self._admitting:
            self._admitting = True
            task = asyncio.ensure_future(self._admit_batches())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def _admit_batches(self) -> None:
        try:
            while self._admissions:
                batch = self._admissions[:_ADMIT_BATCH]
                del self._admissions[: len(batch)]
                try:
                    outcomes = await self._admit_batch([request for request, _ in batch])
                except BaseException as e:  # each caller gets it (StorageUnavailable...)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    if not isinstance(e, Exception):
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._admitting = False

    async def _admit_batch(self, batch: list[_AdmitRequest]) -> list[AdmitResult]:
        a: tuple[list[Any], ...] = tuple([] for _ in range(9))
        c: tuple[list[Any], ...] = tuple([] for _ in range(9))
        for i, r in enumerate(batch, 1):
            loop_intent, digest, since, loop_max = r.loop or (None, None, 0.0, None)
            lease_keys = [ch.key for ch in r.changes if ch.add_reserved]
            for column, value in zip(a, (
                r.agent, r.lease, r.amount, _dump(lease_keys), r.intent,
                loop_intent, digest, since, loop_max,
            ), strict=True):  # fmt: skip
                column.append(value)
            for ch in r.changes:
                k = ch.key
                for column, value in zip(c, (
                    i, k.scope, k.kind, k.start, k.end, ch.add_used, ch.add_reserved, ch.cap,
                    ch.new_only,
                ), strict=True):  # fmt: skip
                    column.append(value)
        nows = [r.now for r in batch]
        # Batches are per process, and a process is one replica.
        rows = await self._statement(ADMIT_CALL, batch[0].replica, nows, *a, *c)
        heads: dict[int, asyncpg.Record] = {}
        counters: dict[int, dict[CounterKey, tuple[int, int]]] = {}
        keys = [{(ch.key.scope, ch.key.kind, ch.key.start): ch.key for ch in r.changes}
                for r in batch]  # fmt: skip
        for row in rows:
            i = row[0]
            if row[6] is None:
                heads[i] = row
            else:
                key = keys[i - 1][(row[6], row[7], row[8])]
                counters.setdefault(i, {})[key] = (int(row[9]), int(row[10]))
        return [
            AdmitResult(
                ok=heads[i][1],
                new_intent=heads[i][2],
                paused=heads[i][3],
                paused_reason=heads[i][4],
                loop_seen=heads[i][5],
                counters=counters.get(i, {}),
            )
            for i in range(1, len(batch) + 1)
        ]

    async def budget_view(self, keys: Sequence[CounterKey], agent: str) -> BudgetView:
        """The counters as they are, and the agent's pause: for a heartbeat's answer, which
        reserves nothing (a counter that does not exist yet is simply absent)."""
        rows = await self._statement(
            "SELECT scope, kind, window_start, window_end, used, reserved FROM budget_counters"
            " WHERE (scope, kind, window_start) IN (SELECT * FROM unnest($1::text[],"
            " $2::text[], $3::float8[]))",
            *_keys(keys)[:3],
        )
        paused, reason = await self.agent_paused(agent)
        counters = {CounterKey(r[0], r[1], r[2], r[3]): [int(r[4]), int(r[5])] for r in rows}
        return BudgetView(counters, paused, reason, set(), 0)

    async def budget_counters(self, now: float) -> list[tuple[CounterKey, int, int]]:
        rows = await self.fetch(
            "SELECT scope, kind, window_start, window_end, used, reserved FROM budget_counters"
            " WHERE (window_end > ? OR (kind = 'cost:minute' AND window_end > ?))"
            " AND (scope NOT LIKE 'intent:%' OR kind = 'cost:minute')",
            [now, now - 3660],  # the last hour's minutes: spend rates read them
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
            raise StorageUnavailable(f"{redact_url(self.url)}: {type(e).__name__}: {e}") from None
        return (True, row[0]) if row is not None else (False, None)

    async def upkeep(self, replica: str, now: float, replica_ttl: float | None) -> int:
        """Heartbeat this replica; release the leases of replicas silent for `replica_ttl`
        (a crashed replica's reservations must not hold budget forever; None: release
        none); prune what no window uses."""

        async def work(conn: asyncpg.Connection) -> int:
            await conn.execute(
                "INSERT INTO replicas (id, last_seen) VALUES ($1, $2) ON CONFLICT (id)"
                " DO UPDATE SET last_seen = excluded.last_seen",
                replica, now,
            )  # fmt: skip
            dead = [] if replica_ttl is None else [r[0] for r in await conn.fetch(
                "SELECT id FROM replicas WHERE last_seen < $1 AND id <> $2 FOR UPDATE SKIP LOCKED",
                now - replica_ttl, replica,
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
            await conn.execute(
                "DELETE FROM budget_counters WHERE kind = 'cost:minute' AND window_end < $1",
                now - MINUTE_COUNTERS_KEEP_SECONDS,
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

    async def release_lease(self, lease: str) -> None:
        """A reservation given back whole (the call was refused after all): its counters'
        reserved amounts go down by what it holds, and the lease is gone."""

        async def work(conn: asyncpg.Connection) -> None:
            row = await conn.fetchrow(
                "DELETE FROM reservations WHERE id = $1 RETURNING amount, counters", lease
            )
            if row is None:
                return
            for key in sorted(_load(row["counters"]), key=_key_order):
                await conn.execute(
                    "UPDATE budget_counters SET reserved = reserved - $4"
                    " WHERE scope = $1 AND kind = $2 AND window_start = $3",
                    key.scope, key.kind, key.start, row["amount"],
                )  # fmt: skip

        await self._run(work)

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
