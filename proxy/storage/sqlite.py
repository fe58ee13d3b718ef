"""SQLite: WAL, one writer thread, one aiosqlite reader connection.

The writer is a thread of our own holding one sqlite3 connection (as datasette does): a
batch of call rows, its rollups and its commit run there as one function, one hop off the
event loop. aiosqlite offers no public way to run several statements and a commit in one
hop of its thread, and each hop is latency on every call's response.

Durability: with `synchronous=NORMAL` in WAL mode a commit is in the WAL file (the OS page
cache) when it returns, so it survives the process being killed; `synchronous=FULL` also
fsyncs the WAL on each commit, for power loss. Reports read from a second connection so
that a long query never delays the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import aiosqlite

from proxy.records import CallRecord
from proxy.storage.base import INSERT_CALL, Storage, StorageError
from proxy.storage.rollups import intent_rows, rollup_rows, upsert_sql

T = TypeVar("T")
_UPSERTS = upsert_sql("sqlite")


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db` or a bare path -> a file path."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        return rest[1:] if rest.startswith("/") else rest
    return url


class SqliteStorage(Storage):
    dialect = "sqlite"
    shared = False

    def __init__(self, url: str, synchronous: str = "NORMAL") -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        self.synchronous = synchronous.upper()
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used only on the writer thread
        self._reader: aiosqlite.Connection | None = None

    async def _on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StorageError(f"{self.path}: the database is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- opening and closing ------------------------------------------------------------

    def _open_writer(self) -> None:
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                raise StorageError(f"{self.path}: directory {parent} does not exist")
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if self.path != ":memory:" and (mode is None or str(mode[0]).lower() != "wal"):
            conn.close()
            raise StorageError(f"{self.path}: cannot switch the database to WAL mode")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._conn = conn

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="meterproxy-sqlite-writer")
        try:
            await self._on_writer(self._open_writer)
            self._reader = await aiosqlite.connect(self.path, timeout=30)
            await self._reader.execute("PRAGMA busy_timeout = 30000")
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise StorageError(f"{self.path}: cannot open the database: {e}") from None
        except StorageError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._reader.close()
            self._reader = None
        if self._executor is not None:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await self._on_writer(self._conn.close)
                self._conn = None
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- writes: all on the writer thread ------------------------------------------------

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self._on_writer(
            self._transaction, lambda conn: conn.execute(sql, params).rowcount
        )

    async def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._on_writer(self._transaction, lambda conn: conn.executemany(sql, rows))

    async def run_script(self, statements: Sequence[str]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            for statement in statements:
                conn.execute(statement)

        await self._on_writer(self._transaction, work)

    async def write_calls(self, records: Sequence[CallRecord]) -> None:
        await self._on_writer(self._transaction, lambda conn: _write_calls(conn, records))

    # -- reads ----------------------------------------------------------------------------

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._reader is None:
            raise StorageError(f"{self.path}: the database is not open")
        async with self._reader.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]


def _write_calls(conn: sqlite3.Connection, records: Sequence[CallRecord]) -> None:
    """Rows, then rollups of the rows really inserted (a replayed id is skipped)."""
    ids = [r.id for r in records]
    placeholders = ", ".join("?" for _ in ids)
    existing = {
        row[0] for row in conn.execute(f"SELECT id FROM calls WHERE id IN ({placeholders})", ids)
    }
    new = [r for r in records if r.id not in existing] if existing else list(records)
    if not new:
        return
    conn.executemany(INSERT_CALL, [r.as_row() for r in new])
    for table, rows in rollup_rows(new).items():
        conn.executemany(_UPSERTS[table], rows)
    intents = intent_rows(new)
    if intents:
        conn.executemany(_UPSERTS["intents"], intents)
