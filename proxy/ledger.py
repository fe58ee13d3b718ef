"""The one writer of call rows: group commit.

Handlers `submit()` a row and await its future. While a batch is being committed, new rows
wait; when it is done, everything that arrived meanwhile goes as the next batch, in one
transaction, so concurrent calls share a commit and no call pays a commit of its own. A
handler awaits its row's commit before the last byte of its response goes out: that is
the durability promise.

There is no writer task: a batch is handed to the storage engine straight from `submit`
(or from the end of the previous batch), and the engine calls back when it is committed.
On a quiet proxy that saves a commit two trips around the event loop.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.records import CallRecord
from proxy.storage import Storage

log = logging.getLogger("meterproxy.ledger")


class LedgerWriter:
    def __init__(self, storage: Storage, *, max_batch: int = 2000) -> None:
        self.storage = storage
        self.max_batch = max_batch
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
        self.storage.write_calls_then([record for record, _ in batch], self._done)

    def _done(self, error: BaseException | None) -> None:
        batch = self._inflight or []
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
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self._flush()

    async def close(self, grace: float = 30.0) -> None:
        """Wait for what is pending to be committed."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.error("ledger: %d rows could not be committed at shutdown", self.backlog)
            if self._retry is not None:
                self._retry.cancel()
