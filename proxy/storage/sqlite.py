"""SQLite through aiosqlite: WAL, one writer connection, one reader connection.

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
from collections.abc import Sequence
from typing import Any

import aiosqlite

from proxy.storage.base import Storage, StorageError


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
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    def _check_directory(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise StorageError(f"{self.path}: directory {parent} does not exist")

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, timeout=30)
        await conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    async def open(self) -> None:
        if self.path != ":memory:":
            await asyncio.to_thread(self._check_directory)
        try:
            self._writer = await self._connect()
            mode = await (await self._writer.execute("PRAGMA journal_mode = WAL")).fetchone()
            if mode is None or (str(mode[0]).lower() != "wal" and self.path != ":memory:"):
                raise StorageError(f"{self.path}: cannot switch the database to WAL mode")
            await self._writer.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._reader = await self._connect()
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise StorageError(f"{self.path}: cannot open the database: {e}") from None

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await conn.close()
        self._reader = self._writer = None

    def _conns(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        if self._writer is None or self._reader is None:
            raise StorageError(f"{self.path}: the database is not open")
        return self._writer, self._reader

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        _, reader = self._conns()
        async with reader.execute(sql, params) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        writer, _ = self._conns()
        async with self._write_lock:
            try:
                cursor = await writer.execute(sql, params)
                await writer.commit()
            except BaseException:
                await writer.rollback()
                raise
            return cursor.rowcount

    async def insert_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        writer, _ = self._conns()
        async with self._write_lock:
            try:
                await writer.executemany(sql, rows)
                await writer.commit()
            except BaseException:
                await writer.rollback()
                raise

    async def run_script(self, statements: Sequence[str]) -> None:
        writer, _ = self._conns()
        async with self._write_lock:
            try:
                await writer.execute("BEGIN")
                for statement in statements:
                    await writer.execute(statement)
                await writer.commit()
            except BaseException:
                await writer.rollback()
                raise
