"""Storage engines behind one interface: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from proxy.storage.base import AggRow, IntentRow, Storage, StorageError, Totals

__all__ = ["AggRow", "IntentRow", "Storage", "StorageError", "Totals", "open_storage"]


def make_storage(url: str, *, sqlite_synchronous: str = "NORMAL", pool_size: int = 10) -> Storage:
    """The engine named by the URL: `postgresql://...` or `sqlite:///path` / a plain path."""
    if url.startswith(("postgresql://", "postgres://")):
        from proxy.storage.postgres import PostgresStorage

        storage: Storage = PostgresStorage(url, max_size=pool_size)
        return storage
    from proxy.storage.sqlite import SqliteStorage

    return SqliteStorage(url, synchronous=sqlite_synchronous)


async def open_storage(
    url: str, *, sqlite_synchronous: str = "NORMAL", pool_size: int = 10
) -> Storage:
    storage = make_storage(url, sqlite_synchronous=sqlite_synchronous, pool_size=pool_size)
    await storage.open()
    try:
        await storage.migrate()
        await storage.start()
    except BaseException:
        await storage.close()
        raise
    return storage
