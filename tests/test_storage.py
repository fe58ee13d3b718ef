"""The storage interface on both engines: same migrations, same rows, same sums."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from pathlib import Path

from proxy.records import CallRecord
from proxy.storage import Storage, open_storage
from proxy.storage.base import CounterKey
from proxy.storage.migrations import MIGRATIONS
from proxy.storage.sqlite import (
    CHECKPOINT_JOBS,
    CHECKPOINT_SECONDS,
    WAL_SYNC_SECONDS,
    SqliteStorage,
    checkpoint_due,
    sync_wal,
)
from tests.records import call_record

T0 = 1_795_000_000.0


def record(i: int, cost: int | None = 1_000, intent: str | None = "task-1") -> CallRecord:
    return call_record(
        f"req_{i}", T0 + i, ended_at=T0 + i + 1, intent=intent,
        model_served="gpt-4o-2024-08-06", cached_input_tokens=2, cost_pico=cost,
        price_version="v1", latency_ms=1.5,
    )  # fmt: skip


async def test_the_same_named_migrations_once(storage: Storage) -> None:
    names = [r[0] for r in await storage.fetch("SELECT name FROM _migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]
    assert await storage.migrate() == []  # a second start applies nothing


async def test_a_row_written_twice_is_stored_and_counted_once(storage: Storage) -> None:
    rows = [record(1), record(2, cost=None), record(3, intent=None)]
    await storage.write_calls(rows)
    await storage.write_calls([rows[0], replace(rows[1], cost_pico=7)])  # a replay
    await storage.sync_rollups()
    assert await storage.count_calls() == 3
    stored = await storage.call("req_2")
    assert stored is not None and stored["cost_pico"] is None  # the first write stands
    sums = await storage.fetch(
        "SELECT SUM(requests), SUM(cost_micro) * 1000000 + SUM(cost_pico_rem), SUM(unpriced),"
        " SUM(input_tokens), SUM(cached_input_tokens) FROM rollup_agent_15m"
    )
    assert [tuple(int(v) for v in sums[0])] == [(3, 2_000, 1, 30, 6)]
    intent = await storage.intent("a", "task-1")
    assert intent is not None
    assert (intent.requests, intent.cost_pico, intent.unpriced) == (2, 1_000, 1)
    assert (intent.first_seen, intent.last_seen) == (T0 + 1, T0 + 2)


async def test_row_values_round_trip(storage: Storage) -> None:
    original = replace(record(9), stream=True, ttfb_ms=12.25, error="upstream 500: boom")
    await storage.write_calls([original])
    stored = await storage.call("req_9")
    assert stored is not None
    assert CallRecord.from_row([stored[c] for c in CallRecord.columns()]) == original


async def test_pauses_and_api_policies_persist(storage: Storage) -> None:
    await storage.set_paused("a", True, "audit", T0)
    await storage.set_paused("b", True, None, T0)
    await storage.set_paused("b", False, None, T0 + 1)
    assert await storage.paused_agents() == {"a": "audit"}
    await storage.put_policy("a", '{"max_cost_per_day_usd": 1}', T0)
    await storage.put_policy("a", '{"max_cost_per_day_usd": 2}', T0 + 1)
    assert await storage.policies() == {"a": '{"max_cost_per_day_usd": 2}'}
    assert await storage.delete_policy("a") is True
    assert await storage.delete_policy("a") is False


async def test_shared_counters_reserve_then_the_row_settles_once(pg_url: str) -> None:
    from proxy.storage.postgres import CounterChange, PostgresStorage

    s = await open_storage(pg_url)
    assert isinstance(s, PostgresStorage)
    day = CounterKey("agent:a", "cost:day", T0 - 100, T0 + 86_300)

    def spend_keys(record: CallRecord) -> list[CounterKey]:
        return [day]

    reserve = CounterChange(day, add_used=0, add_reserved=5_000, cap=10_000)

    try:
        outcome = await s.admit_counters("r1", "a", [reserve], None, ("req_1", 5_000), None, T0)
        assert outcome.ok and outcome.counters == {day: (0, 5_000)}
        assert await s.fetch("SELECT used, reserved FROM budget_counters") == [(0, 5_000)]
        await s.write_calls([record(1, cost=1_234)], spend_keys)
        await s.write_calls(
            [record(1, cost=1_234)], spend_keys
        )  # replayed: neither counted nor released
        assert await s.fetch("SELECT used, reserved FROM budget_counters") == [(1_234, 0)]
        assert await s.fetch("SELECT COUNT(*) FROM reservations") == [(0,)]
    finally:
        await s.close()


def test_a_checkpoint_waits_for_enough_writes_or_enough_time() -> None:
    assert not checkpoint_due(0, 3600.0)  # nothing written: nothing to copy
    assert not checkpoint_due(CHECKPOINT_JOBS - 1, CHECKPOINT_SECONDS - 0.01)
    assert checkpoint_due(CHECKPOINT_JOBS, 0.0)
    assert checkpoint_due(1, CHECKPOINT_SECONDS)
    assert not checkpoint_due(1, CHECKPOINT_SECONDS - 0.01)


def _rows_in_database_file(path: Path) -> int:
    """Rows the checkpoints copied into the database file (`immutable`: the WAL unread)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema was copied yet
        return 0
    except sqlite3.DatabaseError:  # read while a checkpoint was writing the file
        return -1
    finally:
        conn.close()


async def test_sqlite_checkpoints_when_writes_add_up_not_every_second(tmp_path: Path) -> None:
    """A checkpoint that copies the whole WAL makes the next commit fsync the WAL's new
    header: a few calls a second must not pay that every second. Many writes still get
    their checkpoint at once, off the writer."""
    path = tmp_path / "ledger.db"
    storage = SqliteStorage(f"sqlite:///{path}")
    await storage.open()
    await storage.migrate()
    await storage.start()
    try:
        for i in range(5):
            await storage.write_calls([record(i)])
        await asyncio.sleep(1.5)  # six upkeep ticks: the old cadence checkpointed at the 4th
        assert _rows_in_database_file(path) == 0
        for i in range(5, 5 + CHECKPOINT_JOBS):
            await storage.write_calls([record(i)])
        for _ in range(40):
            if _rows_in_database_file(path) == 5 + CHECKPOINT_JOBS:
                break
            await asyncio.sleep(0.05)
        assert _rows_in_database_file(path) == 5 + CHECKPOINT_JOBS
    finally:
        await storage.close()


def test_the_wal_is_synced_only_when_it_changed(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    assert sync_wal(path, None) == (None, False)  # no WAL yet: nothing to sync
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
        mark, synced = sync_wal(path, None)
        assert synced and mark is not None and mark[0] > 0
        assert sync_wal(path, mark) == (mark, False)  # nothing written since
        conn.execute("INSERT INTO t VALUES (1)")
        again, synced = sync_wal(path, mark)
        assert synced and again is not None and again[0] > mark[0]
    finally:
        conn.close()


async def test_sqlite_fsyncs_the_wal_every_second_while_rows_come_under_normal(
    tmp_path: Path,
) -> None:
    """With NORMAL, SQLite fsyncs the WAL only at checkpoints (10 s apart when writes are
    few): the upkeep thread syncs it about once a second, when rows came, so a power loss
    takes about a second of rows at most. None when nothing was written; none with FULL,
    whose commits sync themselves."""

    async def syncs(synchronous: str) -> tuple[int, int]:
        """fsyncs while nothing was written, and after one row."""
        storage = SqliteStorage(f"sqlite:///{tmp_path / synchronous}.db", synchronous)
        await storage.open()
        await storage.migrate()
        await storage.start()
        try:
            await asyncio.sleep(WAL_SYNC_SECONDS + 0.4)  # the migrations' writes get theirs
            quiet = storage.wal_syncs
            await asyncio.sleep(WAL_SYNC_SECONDS + 0.4)
            idle = storage.wal_syncs - quiet
            await storage.write_calls([record(1)])
            await asyncio.sleep(WAL_SYNC_SECONDS + 0.4)
            return idle, storage.wal_syncs - quiet - idle
        finally:
            await storage.close()

    (normal_idle, normal_row), full = await asyncio.gather(syncs("NORMAL"), syncs("FULL"))
    assert normal_idle == 0
    assert normal_row in (1, 2)  # the row, and the rollup of it if it came a second later
    assert full == (0, 0)


async def test_sqlite_keeps_its_wal_bounded_under_writes_that_never_pause(tmp_path: Path) -> None:
    """Commits back to back, with the upkeep thread checkpointing beside them: SQLite
    starts the WAL over only after a checkpoint that copied all of it, which never
    happens beside commits. The writer finishes one past `wal_limit`. (Without it, the
    WAL of this test reached 81 MB; in the bench, 500 MB in 30 s.)"""
    storage = SqliteStorage(f"sqlite:///{tmp_path / 'ledger.db'}", wal_limit=256 * 1024)
    await storage.open()
    await storage.migrate()
    await storage.start()
    try:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        left = 3000

        def one_done(error: BaseException | None) -> None:
            nonlocal left
            assert error is None
            left -= 1
            if not left:
                done.set_result(None)

        for i in range(3000):  # queued at once: the writer never waits for work
            storage.write_calls_then([record(i, intent=f"task-{i % 50}")], one_done)
        await asyncio.wait_for(done, 60)
        assert await storage.count_calls() == 3000
        assert (tmp_path / "ledger.db-wal").stat().st_size < 2 * 1024 * 1024
    finally:
        await storage.close()
