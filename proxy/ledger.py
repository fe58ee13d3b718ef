"""The one writer of call rows: group commit, and a writer no row can poison.

Handlers `submit()` a row and await its future. While a batch is being committed, new rows
wait; when it is done, everything that arrived meanwhile goes as the next batch, in one
transaction, so concurrent calls share a commit and no call pays a commit of its own. A
handler awaits its row's commit before the last byte of its response goes out: that is
the durability promise. The wait is bounded (`commit_timeout`): when a row has waited
that long, the calls waiting are answered without their commit, and later calls do not
wait either until rows commit within the bound again. A database that hangs delays
answers once by `commit_timeout`, never stops the proxy answering, and the answers that
went out unconfirmed are counted (`unconfirmed`). One timer watches the oldest waiting
row, rather than a timeout per call: waiting is the hot path.

There is no writer task: a batch is handed to the storage engine straight from `submit`
(or from the end of the previous batch), and the engine calls back when it is committed.

What can go wrong, and what happens:
- A row that no column could hold (checked before it is queued, `CallRecord.problems`),
  or a batch the database refuses for a reason retrying cannot fix (`is_permanent`):
  the batch is written again row by row, the rows that still fail are quarantined (kept
  whole in the `quarantine` table, else a JSONL file), counted and named in one ERROR
  line each; every other row is committed.
- The database busy or failing for a while: the batch is retried with backoff; after
  `stall_seconds` without progress `stalled` is true (health says `degraded`).
- PostgreSQL unreachable: batches go to a local spool file instead, fsynced before their
  calls are answered, and `keep()` replays them once the database answers again.
- Shutdown: `close(grace)` waits at most `grace`; rows still unwritten then are saved to
  the quarantine file and counted in the log, never silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from proxy.records import CallRecord
from proxy.spool import Spool
from proxy.storage import Storage
from proxy.storage.base import SpendKeys, StorageUnavailable

PROBE_SECONDS = 1.0  # while offline: how often the database is tried again

log = logging.getLogger("meterproxy.ledger")
# A row, the future its caller may await (True: committed or set aside; False: answered
# without its commit), and when it was submitted (monotonic).
_Entry = tuple[CallRecord, asyncio.Future[bool], float]


class LedgerWriter:
    def __init__(
        self,
        storage: Storage,
        *,
        max_batch: int = 2000,
        spool: Spool | None = None,
        spend_keys: SpendKeys | None = None,
        commit_timeout: float = 5.0,
        stall_seconds: float = 10.0,
        quarantine_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.max_batch = max_batch
        self.spool = spool
        self.spend_keys = spend_keys
        self.commit_timeout = commit_timeout
        self.stall_seconds = stall_seconds
        self.quarantine_file = quarantine_file
        self.clock = clock
        self.offline = False  # the database was unreachable: batches go to the spool
        self._spooling: set[asyncio.Future[None]] = set()
        self.late = False  # a row waited past commit_timeout: calls do not wait for theirs
        self._watchdog: asyncio.TimerHandle | None = None
        self._pending: list[_Entry] = []
        self._suspects: deque[_Entry] = deque()  # a refused batch, retried row by row
        self._inflight: list[_Entry] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._delay = 0.05
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress = time.monotonic()  # last commit, or the moment work started waiting
        self._tasks: set[asyncio.Future[None]] = set()
        self.commits = 0
        self.rows = 0
        self.failures = 0
        self.quarantined = 0
        self.unconfirmed = 0  # calls answered before their row was committed

    @property
    def backlog(self) -> int:
        """Rows submitted and not yet committed."""
        return len(self._pending) + len(self._suspects) + len(self._inflight or ())

    @property
    def seconds_since_progress(self) -> float:
        """How long rows have been waiting without any commit (0 when none wait)."""
        return time.monotonic() - self._progress if self.backlog else 0.0

    @property
    def stalled(self) -> bool:
        return self.seconds_since_progress >= self.stall_seconds

    def submit(self, record: CallRecord) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        now = time.monotonic()
        problems = record.problems()
        if problems:  # it would fail its whole batch: set aside before it joins one
            self._set_aside([(record, future, now)], "; ".join(problems))
            return future
        if not self.backlog:
            self._progress = now
        self._pending.append((record, future, now))
        self._idle.clear()
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.commit_timeout, self._overdue)
        if self._inflight is None and self._retry is None:
            self._flush()
        return future

    async def commit(self, record: CallRecord) -> None:
        """Submit and wait for the commit, at most `commit_timeout` (none while the
        ledger is late). Cancelling the caller cancels only its wait: the writer holds the
        record itself and commits it whether anyone still waits or not."""
        future = self.submit(record)
        if self.late or not await future:
            self.unconfirmed += 1

    # -- the bound on waiting ------------------------------------------------------------

    def _waiting(self) -> list[_Entry]:
        """Rows not yet committed, oldest first."""
        return [*(self._inflight or ()), *self._suspects, *self._pending]

    def _overdue(self) -> None:
        """The watchdog: answers the callers of rows that waited `commit_timeout`, and
        sleeps until the next row would have."""
        self._watchdog = None
        now = time.monotonic()
        waiting = [e for e in self._waiting() if not e[1].done()]
        if not waiting:
            return
        overdue = [e for e in waiting if now - e[2] >= self.commit_timeout]
        if overdue:
            if not self.late:
                log.warning(
                    "ledger: a commit took longer than %gs (%d rows waiting); calls are"
                    " answered without waiting for their rows until it catches up",
                    self.commit_timeout, self.backlog,
                )  # fmt: skip
            self.late = True
            for _, future, _ in overdue:
                future.set_result(False)
        unanswered = [e[2] for e in waiting if not e[1].done()]
        delay = min(unanswered) + self.commit_timeout - now if unanswered else self.commit_timeout
        self._watchdog = asyncio.get_running_loop().call_later(max(delay, 0.0), self._overdue)

    # -- batches -----------------------------------------------------------------------

    def _flush(self) -> None:
        self._retry = None
        if self._suspects:
            batch = [self._suspects.popleft()]  # one at a time: find the rows that fail
        elif self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: len(batch)]
        else:
            self._idle.set()
            return
        self._inflight = batch
        if self.offline:
            self._to_spool(batch)
        else:
            self.storage.write_calls_then([e[0] for e in batch], self._done, self.spend_keys)

    def _done(self, error: BaseException | None) -> None:
        batch = self._inflight or []
        if isinstance(error, StorageUnavailable) and self.spool is not None:
            if not self.offline:
                log.error("ledger: %s; rows go to the spool in %s until it is back",
                          error, self.spool.directory)  # fmt: skip
                self.offline = True
            self._to_spool(batch)
            return
        self._inflight = None
        if error is not None and self.storage.is_permanent(error):
            if len(batch) > 1:
                log.warning(
                    "ledger: a batch of %d rows was refused (%s: %s); writing them one by one",
                    len(batch), type(error).__name__, error,
                )  # fmt: skip
                self._suspects.extend(batch)
            else:
                self._set_aside(batch, f"{type(error).__name__}: {error}")
            self._flush()
            return
        if error is not None:
            self.failures += 1
            log.error(
                "ledger commit of %d rows failed (%s: %s); retrying in %.2fs",
                len(batch), type(error).__name__, error, self._delay,
            )  # fmt: skip
            self._pending[:0] = batch  # first in line again, nothing lost
            self._retry = asyncio.get_running_loop().call_later(self._delay, self._flush)
            self._delay = min(self._delay * 2, 5.0)
            return
        self._delay = 0.05
        self._progress = time.monotonic()
        self.commits += 1
        self.rows += len(batch)
        self._answer(batch)

    def _answer(self, batch: list[_Entry]) -> None:
        for _, future, _ in batch:
            if not future.done():
                future.set_result(True)
        caught_up = not self._pending and not self._suspects
        quick = bool(batch) and self._progress - batch[0][2] < self.commit_timeout
        if self.late and (caught_up or quick):
            self.late = False  # rows commit within the bound again: calls wait for theirs
            log.warning("ledger: commits are back within %gs; calls wait for their rows again",
                        self.commit_timeout)  # fmt: skip
        self._flush()

    # -- quarantine --------------------------------------------------------------------

    def _set_aside(self, entries: list[_Entry], why: str) -> None:
        """Rows that cannot be stored: kept whole where they can be inspected, and their
        callers answered (the rest of the ledger goes on)."""
        self.quarantined += len(entries)
        for record, future, _ in entries:
            log.error(
                "ledger: row %s (agent %s, %s %s) cannot be stored and is quarantined: %s",
                record.id, record.agent, record.method, record.endpoint, why,
            )  # fmt: skip
            if not future.done():
                future.set_result(True)
        aside = [(e[0], why) for e in entries]
        task = asyncio.ensure_future(self._keep_aside(aside))
        self._tasks.add(task)  # held until done, so it is not collected half-way
        task.add_done_callback(self._tasks.discard)

    async def _keep_aside(self, entries: list[tuple[CallRecord, str]]) -> None:
        try:
            await self.storage.quarantine(entries, self.clock())
        except Exception as e:
            log.error("ledger: the quarantine table refused too (%s); rows go to %s", e,
                      self.quarantine_file)  # fmt: skip
            await asyncio.to_thread(self._to_file, entries)

    def _to_file(self, entries: list[tuple[CallRecord, str]]) -> None:
        if self.quarantine_file is None:
            for record, why in entries:  # nowhere else: the log line keeps the row
                log.error("ledger: lost row %s: %s", json.dumps(record.as_row()), why)
            return
        self.quarantine_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.quarantine_file, "a", encoding="utf-8") as f:
            for record, why in entries:
                f.write(json.dumps({"error": why, "row": record.as_row()}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- the spool (PostgreSQL unreachable) ----------------------------------------------

    def _to_spool(self, batch: list[_Entry]) -> None:
        assert self.spool is not None
        records = [e[0] for e in batch]
        task = asyncio.ensure_future(self.spool.append(records))
        self._spooling.add(task)  # a reference, so the task is not collected mid-write
        task.add_done_callback(self._spooling.discard)
        task.add_done_callback(lambda t: self._spooled(batch, t))

    def _spooled(self, batch: list[_Entry], task: asyncio.Future[None]) -> None:
        self._inflight = None
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if error is not None:  # the disk failed too: keep them in memory and try again
            self.failures += 1
            log.error("ledger: spooling %d rows failed (%s); retrying", len(batch), error)
            self._pending[:0] = batch
            self._retry = asyncio.get_running_loop().call_later(self._delay, self._flush)
            self._delay = min(self._delay * 2, 5.0)
            return
        self._progress = time.monotonic()
        self._answer(batch)

    async def keep(self) -> None:
        """Background task: while offline, try the database every second; once it answers,
        send new rows to it again and replay the spool (also what a crash left there)."""
        assert self.spool is not None
        while True:
            try:
                if self.offline:
                    await self.storage.ping()
                    log.warning("ledger: the database is reachable again")
                    self.offline = False
                if await self.spool.pending():
                    await self.spool.replay(
                        lambda rows: self.storage.write_calls(rows, self.spend_keys)
                    )
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("ledger: replaying the spool failed")
            await asyncio.sleep(PROBE_SECONDS)

    # -- shutdown ----------------------------------------------------------------------

    async def close(self, grace: float = 30.0) -> int:
        """Wait up to `grace` for what is pending to be committed; returns how many rows
        could not be (they are saved to the quarantine file, not dropped)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(grace, 0.0))
        for timer in (self._retry, self._watchdog):
            if timer is not None:
                timer.cancel()
        self._retry = self._watchdog = None
        left = self._waiting()
        if left:
            log.error(
                "ledger: %d rows could not be written before shutdown; they are saved to %s",
                len(left), self.quarantine_file or "the log",
            )  # fmt: skip
            await asyncio.to_thread(self._to_file, [(e[0], "not written before shutdown")
                                                    for e in left])  # fmt: skip
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=max(grace, 1.0))
        return len(left)
