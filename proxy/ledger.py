"""The one writer of call rows: group commit.

Handlers `submit()` a row and await its future. While a batch is being committed, new rows
wait; when it is done, everything that arrived meanwhile goes as the next batch, in one
transaction, so concurrent calls share a commit and no call pays a commit of its own. A
handler awaits its row's commit before the last byte of its response goes out: that is
the durability promise.

There is no writer task: a batch is handed to the storage engine straight from `submit`
(or from the end of the previous batch), and the engine calls back when it is committed.
On a quiet proxy that saves a commit two trips around the event loop.

When the database cannot be reached (PostgreSQL down or restarting), batches go to a local
spool file instead, fsynced before their calls are answered, and `keep()` replays them
once the database answers again: nothing is lost, and nothing is counted twice (a row's
id is its key).
"""

from __future__ import annotations

import asyncio
import logging

from proxy.records import CallRecord
from proxy.spool import Spool
from proxy.storage import Storage
from proxy.storage.base import StorageUnavailable

PROBE_SECONDS = 1.0  # while offline: how often the database is tried again

log = logging.getLogger("meterproxy.ledger")


class LedgerWriter:
    def __init__(
        self, storage: Storage, *, max_batch: int = 2000, spool: Spool | None = None
    ) -> None:
        self.storage = storage
        self.max_batch = max_batch
        self.spool = spool
        self.offline = False  # the database was unreachable: batches go to the spool
        self._spooling: set[asyncio.Future[None]] = set()
        self._pending: list[tuple[CallRecord, asyncio.Future[None]]] = []
        self._inflight: list[tuple[CallRecord, asyncio.Future[None]]] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._delay = 0.05
        self._idle = asyncio.Event()
        self._idle.set()
        self.commits = 0
        self.rows = 0
        self.failures = 0

    @property
    def backlog(self) -> int:
        """Rows submitted and not yet committed."""
        return len(self._pending) + len(self._inflight or ())

    def submit(self, record: CallRecord) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._idle.clear()
        if self._inflight is None and self._retry is None:
            self._flush()
        return future

    async def commit(self, record: CallRecord) -> None:
        """Submit and wait for the commit. Cancelling the caller does not drop the row: the
        writer holds the record itself and commits it whether anyone still waits or not."""
        await self.submit(record)

    def _flush(self) -> None:
        self._retry = None
        if not self._pending:
            self._idle.set()
            return
        batch = self._pending[: self.max_batch]
        del self._pending[: len(batch)]
        self._inflight = batch
        if self.offline:
            self._to_spool(batch)
        else:
            self.storage.write_calls_then([record for record, _ in batch], self._done)

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
        if error is not None:
            self.failures += 1
            log.error(
                "ledger commit of %d rows failed (%s: %s); retrying in %.2fs",
                len(batch),
                type(error).__name__,
                error,
                self._delay,
            )
            self._pending[:0] = batch  # first in line again, nothing lost
            self._retry = asyncio.get_running_loop().call_later(self._delay, self._flush)
            self._delay = min(self._delay * 2, 5.0)
            return
        self._delay = 0.05
        self.commits += 1
        self.rows += len(batch)
        self._answer(batch)

    def _answer(self, batch: list[tuple[CallRecord, asyncio.Future[None]]]) -> None:
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self._flush()

    def _to_spool(self, batch: list[tuple[CallRecord, asyncio.Future[None]]]) -> None:
        assert self.spool is not None
        records = [record for record, _ in batch]
        task = asyncio.ensure_future(self.spool.append(records))
        self._spooling.add(task)  # a reference, so the task is not collected mid-write
        task.add_done_callback(self._spooling.discard)
        task.add_done_callback(lambda t: self._spooled(batch, t))

    def _spooled(
        self, batch: list[tuple[CallRecord, asyncio.Future[None]]], task: asyncio.Future[None]
    ) -> None:
        self._inflight = None
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        if error is not None:  # the disk failed too: keep them in memory and try again
            self.failures += 1
            log.error("ledger: spooling %d rows failed (%s); retrying", len(batch), error)
            self._pending[:0] = batch
            self._retry = asyncio.get_running_loop().call_later(self._delay, self._flush)
            self._delay = min(self._delay * 2, 5.0)
            return
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
                    await self.spool.replay(self.storage.write_calls)
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("ledger: replaying the spool failed")
            await asyncio.sleep(PROBE_SECONDS)

    async def close(self, grace: float = 30.0) -> None:
        """Wait for what is pending to be committed."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.error("ledger: %d rows could not be committed at shutdown", self.backlog)
            if self._retry is not None:
                self._retry.cancel()
