"""The one writer of call rows: group commit.

Handlers `submit()` a row and await its future; the writer task commits everything
submitted while the previous commit ran in one transaction, so concurrent calls share a
commit and no call pays a commit of its own. A handler awaits its row's commit before the
last byte of its response goes out: that is the durability promise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.records import CallRecord
from proxy.storage import Storage

log = logging.getLogger("meterproxy.ledger")


class LedgerWriter:
    def __init__(
        self,
        storage: Storage,
        *,
        max_batch: int = 2000,
        on_commit: Callable[[list[CallRecord]], None] | None = None,
    ) -> None:
        self.storage = storage
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._pending: list[tuple[CallRecord, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        self.rows = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="meterproxy-ledger-writer")

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def submit(self, record: CallRecord) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wakeup.set()
        return future

    async def commit(self, record: CallRecord) -> None:
        """Submit and wait for the commit. Cancelling the caller does not drop the row: the
        writer holds the record itself and commits it whether anyone still waits or not."""
        await self.submit(record)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._pending[: self.max_batch]
            try:
                await self.storage.write_calls([record for record, _ in batch])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                log.error(
                    "ledger commit of %d rows failed (%s: %s); retrying in %.2fs",
                    len(batch),
                    type(e).__name__,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            del self._pending[: len(batch)]
            self.commits += 1
            self.rows += len(batch)
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            if self.on_commit is not None:
                self.on_commit([record for record, _ in batch])

    async def close(self, grace: float = 30.0) -> None:
        """Flush what is pending, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            log.error("ledger: %d rows could not be committed at shutdown", len(self._pending))
            self._task.cancel()
