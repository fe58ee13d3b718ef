from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.app import Options, create_app, runner_options
from proxy.config import Config, Upstream
from proxy.services import SERVICES, Services
from proxy.storage import Storage, open_storage
from tests.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """Wall-clock time the tests set: windows, resets and timestamps follow it."""

    def __init__(self, now: float = 1_795_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Proxy:
    server: TestServer
    config: Config

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def svc(self) -> Services:
        return self.server.app[SERVICES]

    async def flushed(self) -> None:
        """Wait until every submitted ledger row is committed."""
        for _ in range(500):
            if self.svc.ledger.backlog == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("ledger did not flush")

    async def rows(self) -> list[dict[str, Any]]:
        """Every ledger row, once committed, oldest first."""
        await self.flushed()
        return list(reversed(await self.svc.storage.recent_calls(10_000)))


@pytest.fixture
async def fake(aiohttp_server: Any) -> AsyncIterator[tuple[FakeUpstream, str]]:
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app())
    yield upstream, str(server.make_url("/v1")).rstrip("/")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    """The proxy's database; modules that test storage-backed behaviour override this with
    `db_url` to run on both engines."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture
async def make_proxy(
    aiohttp_server: Any, fake: tuple[FakeUpstream, str], ledger_url: str, tmp_path: Path
) -> ProxyFactory:
    _, fake_url = fake

    async def factory(
        config: Config | None = None, options: Options | None = None, **changes: Any
    ) -> Proxy:
        base = config or Config(
            upstreams=(Upstream("fake", fake_url, default=True),),
            db_url=ledger_url,
            spool_dir=tmp_path / "spool",
            reload_interval_seconds=0.05,
        )
        cfg = base.with_overrides(**changes)
        app = create_app(cfg, options)
        # aiohttp's test server always sets handler_cancellation itself (to True, as we do).
        kwargs = {k: v for k, v in runner_options(cfg).items() if k != "handler_cancellation"}
        server = await aiohttp_server(app, **kwargs)
        return Proxy(server, cfg)

    return factory


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


async def raw_request(proxy: Proxy, data: bytes, wait: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are (clients refuse to send malformed requests) -> status, body."""
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(data)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Any:
    from tests.pg import started_cluster

    pg = started_cluster()
    yield pg
    pg.destroy()


@pytest.fixture
def pg_url(postgres: Any) -> str:
    """A fresh, empty database on the throwaway cluster."""
    return str(postgres.create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: Any, tmp_path: Path) -> str:
    """Each test using it runs on both engines."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """An opened, migrated ledger on each engine: the same tests, the same numbers."""
    s = await open_storage(db_url)
    yield s
    await s.close()
