"""Ledger rows that could not reach the database, kept on local disk until it is back.

One JSON line per row, appended and fsynced before the call is answered, so a row the
client was answered for survives a crash of the proxy as well as the outage. Each process
writes its own file and holds an exclusive `flock` on it while it does; replay takes any
file no live process holds (its own sealed files, or those a dead replica left), writes
the rows (the ledger skips an id it already has, so a file replayed twice counts once) and
deletes the file. All file work runs on one thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from proxy.records import CallRecord

log = logging.getLogger("meterproxy.ledger")
T = TypeVar("T")
SUFFIX = ".jsonl"
REPLAY_BATCH = 500


class Spool:
    def __init__(self, directory: Path, owner: str) -> None:
        self.directory = directory
        self.owner = owner  # this process's name in its files' names
        self._file: IO[bytes] | None = None
        self._serial = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="meterproxy-spool")
        self.spooled = 0
        self.replayed = 0

    async def _on_thread(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    # -- writing -------------------------------------------------------------------------

    async def append(self, records: Sequence[CallRecord]) -> None:
        data = b"".join(orjson.dumps(r.as_row()) + b"\n" for r in records)
        await self._on_thread(self._append, data)
        self.spooled += len(records)

    def _append(self, data: bytes) -> None:
        if self._file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._serial += 1
            path = self.directory / f"{self.owner}-{self._serial}{SUFFIX}"
            f = open(path, "ab")  # noqa: SIM115  (held open across appends)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = f
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def _seal(self) -> None:
        """Close the file being written (releasing its lock): the next append starts a new
        one, and this one can be replayed."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- replay --------------------------------------------------------------------------

    async def pending(self) -> bool:
        """Whether any spool file is waiting (this process's, or one a dead one left)."""
        return self._file is not None or bool(await self._on_thread(self._files, False))

    def _files(self, seal: bool) -> list[Path]:
        if seal:
            self._seal()
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        current = Path(self._file.name).name if self._file is not None else None
        return [self.directory / n for n in names if n.endswith(SUFFIX) and n != current]

    async def replay(self, write: Callable[[list[CallRecord]], Awaitable[None]]) -> int:
        """Write every claimable spool file's rows with `write`, then delete the file. A
        failure leaves the file in place for the next attempt."""
        total = 0
        for path in await self._on_thread(self._files, True):
            claimed = await self._on_thread(_claim, path)
            if claimed is None:
                continue  # a live process is writing or replaying it
            f, rows = claimed
            try:
                for i in range(0, len(rows), REPLAY_BATCH):
                    await write([CallRecord.from_row(r) for r in rows[i : i + REPLAY_BATCH]])
                await self._on_thread(_remove, path)
            finally:
                await self._on_thread(f.close)
            total += len(rows)
            log.warning("ledger: replayed %d spooled rows from %s", len(rows), path)
        self.replayed += total
        return total

    async def close(self) -> None:
        await self._on_thread(self._seal)
        self._thread.shutdown(wait=True)


def _claim(path: Path) -> tuple[IO[bytes], list[list[Any]]] | None:
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed by the caller)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    rows = []
    for number, line in enumerate(f.read().splitlines(), 1):
        try:
            rows.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            # Only a crash in the middle of an append leaves a torn line; that row's call
            # was never answered (the answer waits for the fsync).
            log.error("ledger: %s line %d is torn (a crash mid-write); skipped", path, number)
    return f, rows


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
