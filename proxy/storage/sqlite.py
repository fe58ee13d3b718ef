"""SQLite: WAL, one writer thread, one aiosqlite reader, one maintenance thread.

The writer is a thread of our own holding one sqlite3 connection (as datasette does): a
batch of call rows and its commit run there as one job, one hop off the event loop.
aiosqlite offers no public way to run several statements and a commit in one hop of its
thread, and every hop is latency on a response that waits for its row's commit.

Only the call rows are written on that path. Rollups and intent totals are brought up to
date from the rows (by `calls.seq`) every quarter second by the maintenance thread, which
also runs the WAL checkpoints (their fsync would otherwise stall the commits behind them).
Reports and the budget rebuild call `sync_rollups()` first, so they never see a lag.

Durability: with `synchronous=NORMAL` in WAL mode a commit is in the WAL file (the OS page
cache) when it returns, so it survives the process being killed; `synchronous=FULL` also
fsyncs the WAL on each commit, for power loss. Reports read from a connection of their own,
so a long query never delays the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import aiosqlite

from proxy.records import CallRecord
from proxy.storage.base import INSERT_CALL, SpendKeys, Storage, StorageError
from proxy.storage.rollups import rollup_statements

T = TypeVar("T")
log = logging.getLogger("meterproxy.storage")
ROLLUP_SECONDS = 0.25  # small, frequent rollups: each delays the commits behind it a little
# A checkpoint that copies the whole WAL makes the next commit start it over, and SQLite
# fsyncs the WAL's new header inside that commit (0.2-0.8 ms here; a cloud disk takes
# milliseconds). Once a second, that was one call in 20 at 20 calls/s. Checkpoints now
# wait for this many writer jobs (about the WAL SQLite itself would checkpoint at, 4 MB,
# and a second or less under load) or, when writes are few, this long.
CHECKPOINT_JOBS = 256
CHECKPOINT_SECONDS = 10.0
# With synchronous=NORMAL SQLite fsyncs the WAL only at checkpoints, so at 10 s between
# them a power loss could take 10 s of rows. The upkeep thread fsyncs the WAL itself this
# often when it changed: off the commit path (no call waits for it), and the bound on
# what a power loss takes stays about a second.
WAL_SYNC_SECONDS = 1.0
WAL_LIMIT_BYTES = 16 << 20  # past this the writer finishes a checkpoint: the WAL starts over
_WAL_LOOK_EVERY = 64  # writer jobs between two looks at the WAL's size
_MARK = "SELECT seq FROM rollup_progress WHERE name = 'calls'"
_ROLLUP = rollup_statements("sqlite", "seq > ? AND seq <= ?")
# (work, the loop and future to answer on, or None for upkeep nobody waits for)
_Job = tuple[
    Callable[[sqlite3.Connection], Any],
    asyncio.AbstractEventLoop | None,
    asyncio.Future[Any] | None,
]


def sqlite_path(url: str) -> str:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db` or a bare path -> a file path."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        return rest[1:] if rest.startswith("/") else rest
    return url


def _connect(path: str, busy_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    return conn


async def _join(thread: threading.Thread, deadline: float) -> None:
    """Wait for a thread until `deadline`, on a daemon thread of its own: the loop's
    executor would wait for a stuck one at exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def join() -> None:
        thread.join()
        with contextlib.suppress(RuntimeError):  # the loop closed while it waited
            loop.call_soon_threadsafe(_set_result, done, None)

    threading.Thread(target=join, name="meterproxy-join", daemon=True).start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done, max(deadline - time.monotonic(), 0.0))


def checkpoint_due(jobs: int, seconds: float) -> bool:
    """Whether the upkeep thread checkpoints now, `jobs` writer jobs and `seconds` after
    its last checkpoint (see CHECKPOINT_JOBS)."""
    return jobs >= CHECKPOINT_JOBS or (jobs > 0 and seconds >= CHECKPOINT_SECONDS)


def _checkpoint(conn: sqlite3.Connection, where: str) -> None:
    """A PASSIVE checkpoint (it takes no write lock); a failure is logged, and the next
    one tries again."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as e:
        log.warning("%s: %s", where, e)


WalMark = tuple[int, int]  # the WAL's size and mtime when it was last synced


def sync_wal(path: str, last: WalMark | None) -> tuple[WalMark | None, bool]:
    """fsync the WAL file of the database at `path` if it changed since `last`; returns
    its new mark, and whether it was synced. Any descriptor's fsync flushes the file."""
    try:
        fd = os.open(path + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return None, False
    try:
        stat = os.fstat(fd)
        mark = (stat.st_size, stat.st_mtime_ns)
        if mark == last:
            return mark, False
        os.fdatasync(fd)
        return mark, True
    finally:
        os.close(fd)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class SqliteStorage(Storage):
    dialect = "sqlite"
    shared = False

    def __init__(
        self, url: str, synchronous: str = "NORMAL", wal_limit: int = WAL_LIMIT_BYTES
    ) -> None:
        super().__init__(url)
        self.path = sqlite_path(url)
        self.synchronous = synchronous.upper()
        self.wal_limit = wal_limit
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._reader: aiosqlite.Connection | None = None
        self._maintenance: threading.Thread | None = None
        self._stop = threading.Event()
        self._rollup_lock = threading.Lock()
        self._jobs_done = 0  # by the writer thread; read by the upkeep thread
        self.wal_syncs = 0  # by the upkeep thread (see WAL_SYNC_SECONDS)

    # -- the writer thread ---------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                conn.close()
                return
            work, loop, future = job
            try:
                result = work(conn)
            except BaseException as e:  # handed to whoever waits for this job
                if loop is None:
                    log.warning("storage upkeep: %s (retrying)", e)
                elif future is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                if loop is not None and future is not None and not loop.is_closed():
                    loop.call_soon_threadsafe(_set_result, future, result)
            self._jobs_done += 1
            if self._jobs_done % _WAL_LOOK_EVERY == 0:  # after the job: its callers come first
                self._bound_wal(conn)

    async def _on_writer(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StorageError(f"{self.path}: the database is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((work, loop, future))
        return await future

    @staticmethod
    def _transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        """SQLite starts the WAL over only after a checkpoint that copied all of it. The
        upkeep thread's checkpoints run beside the commits: under writes that never pause,
        commits land behind every one, and the WAL grew without bound (500 MB in 30 s at
        2,500 calls/s, every page looked up through its ever larger index: throughput
        fell round after round). The writer, between two commits, is the one place where
        no commit runs beside a checkpoint; most frames are copied by the upkeep thread
        already, so this one is short. `journal_size_limit` truncates the file after."""
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size > self.wal_limit:
            _checkpoint(conn, "storage: checkpoint on the writer")

    # -- opening and closing ---------------------------------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            parent = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(parent):
                raise StorageError(f"{self.path}: directory {parent} does not exist")
        conn = _connect(self.path, 30_000)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if self.path != ":memory:" and (mode is None or str(mode[0]).lower() != "wal"):
            conn.close()
            raise StorageError(f"{self.path}: cannot switch the database to WAL mode")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        # Checkpoints copy the WAL into the database and fsync it: tens of milliseconds.
        # Run by the writer they would stall every call waiting for its commit: the
        # upkeep thread runs them, and the writer only finishes one when the WAL is
        # past its bound (see _bound_wal).
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {self.wal_limit}")
        return conn

    async def open(self) -> None:
        try:
            conn = await asyncio.to_thread(self._open_writer)
            self._writer = threading.Thread(
                target=self._write_loop, args=(conn,), name="meterproxy-sqlite-writer", daemon=True
            )
            self._writer.start()
            self._reader = await aiosqlite.connect(self.path, timeout=30)
            await self._reader.execute("PRAGMA busy_timeout = 30000")
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise StorageError(f"{self.path}: cannot open the database: {e}") from None
        except StorageError:
            await self.close()
            raise

    async def start(self) -> None:
        await self.sync_rollups()
        if self.path != ":memory:":
            self._stop.clear()
            self._maintenance = threading.Thread(
                target=self._maintenance_loop, name="meterproxy-sqlite-upkeep", daemon=True
            )
            self._maintenance.start()

    async def close(self, grace: float = 10.0) -> None:
        """Stop the threads, in at most `grace` seconds: a writer stuck in a locked database
        (busy for up to 30 s) must not hold up the exit. Its threads are daemons, and the
        ledger has already saved what it could not write."""
        deadline = time.monotonic() + grace
        if self._maintenance is not None:
            self._stop.set()
            await _join(self._maintenance, deadline)
            self._maintenance = None
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error, StorageError, TimeoutError):
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await self.sync_rollups()
                    await self._on_writer(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
            self._jobs.put(None)
            await _join(self._writer, deadline)
            self._writer = None
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error):
                await self._reader.close()
            self._reader = None

    # -- writes ----------------------------------------------------------------------------

    def is_permanent(self, error: BaseException) -> bool:
        if isinstance(error, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                              sqlite3.ProgrammingError)):  # fmt: skip
            return True
        if isinstance(error, sqlite3.OperationalError):
            text = str(error).lower()
            return any(w in text for w in ("overflow", "too big", "mismatch", "no such column"))
        return super().is_permanent(error)

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self._on_writer(
            lambda conn: self._transaction(conn, lambda c: c.execute(sql, params).rowcount)
        )

    async def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._on_writer(
            lambda conn: self._transaction(conn, lambda c: c.executemany(sql, rows))
        )

    async def run_script(self, statements: Sequence[str]) -> None:
        def work(conn: sqlite3.Connection) -> None:
            for statement in statements:
                conn.execute(statement)

        await self._on_writer(lambda conn: self._transaction(conn, work))

    def write_calls_then(
        self,
        records: Sequence[CallRecord],
        done: Callable[[BaseException | None], None],
        spend_keys: SpendKeys | None = None,
    ) -> None:
        """Straight onto the writer thread; it calls `done` back on the loop. (Budget
        counters live in memory with SQLite: `spend_keys` is not needed.)"""
        rows = [r.as_row() for r in records]
        loop = asyncio.get_running_loop()

        def work(conn: sqlite3.Connection) -> None:
            try:
                if len(rows) == 1:
                    conn.execute(INSERT_CALL, rows[0])
                else:
                    self._transaction(conn, lambda c: c.executemany(INSERT_CALL, rows))
            except BaseException as e:  # handed back to the ledger writer
                if not loop.is_closed():
                    loop.call_soon_threadsafe(done, e)
                return
            if not loop.is_closed():
                loop.call_soon_threadsafe(done, None)

        if self._writer is None:
            done(StorageError(f"{self.path}: the database is not open"))
            return
        self._jobs.put((work, None, None))

    async def write_calls(
        self, records: Sequence[CallRecord], spend_keys: SpendKeys | None = None
    ) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(error: BaseException | None) -> None:
            if error is None:
                _set_result(future, None)
            else:
                _set_exception(future, error)

        self.write_calls_then(records, done)
        await future

    # -- upkeep: rollups and checkpoints, off the write path -----------------------------

    def _maintenance_loop(self) -> None:
        """Rollups go to the writer thread, between two commits: as a second writer they
        would make the commits wait on SQLite's busy handler, which sleeps in steps of
        milliseconds. Checkpoints stay here: PASSIVE ones take no write lock."""
        conn = _connect(self.path, 2_000)
        jobs_then, then = self._jobs_done, time.monotonic()
        synced_at, wal_mark = then, None
        try:
            while not self._stop.wait(ROLLUP_SECONDS):
                self._jobs.put((self._roll_up, None, None))
                now = time.monotonic()
                if checkpoint_due(self._jobs_done - jobs_then, now - then):
                    jobs_then, then = self._jobs_done, now
                    _checkpoint(conn, "storage upkeep: checkpoint")
                if self.synchronous == "NORMAL" and now - synced_at >= WAL_SYNC_SECONDS:
                    synced_at = now
                    wal_mark = self._sync_wal(wal_mark)
        finally:
            conn.close()

    def _sync_wal(self, last: WalMark | None) -> WalMark | None:
        try:
            mark, synced = sync_wal(self.path, last)
        except OSError as e:
            log.warning("storage upkeep: cannot fsync %s-wal: %s", self.path, e)
            return last
        self.wal_syncs += synced
        return mark

    def _roll_up(self, conn: sqlite3.Connection) -> int:
        """Count call rows past the progress mark into the rollups and intent totals. The
        database does the aggregation (no Python per row: nothing holds the GIL for long),
        and the mark moves in the same transaction, so each row is counted exactly once,
        even with another process doing the same (the report command, say)."""
        with self._rollup_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                mark = conn.execute(_MARK).fetchone()[0]
                top = conn.execute("SELECT MAX(seq) FROM calls").fetchone()[0]
                if top is None or top <= mark:
                    conn.execute("COMMIT")
                    return 0
                for statement in _ROLLUP:
                    conn.execute(statement, (mark, top))
                conn.execute("UPDATE rollup_progress SET seq = ? WHERE name = 'calls'", (top,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return int(top - mark)

    async def sync_rollups(self) -> None:
        if self._writer is None:
            raise StorageError(f"{self.path}: the database is not open")
        # On the writer thread: every row submitted before this call is counted.
        await self._on_writer(self._roll_up)

    # -- reads ------------------------------------------------------------------------------

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self._reader is None:
            raise StorageError(f"{self.path}: the database is not open")
        async with self._reader.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]
