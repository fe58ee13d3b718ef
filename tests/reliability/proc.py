"""`meterproxy serve` as a real subprocess, for signal and crash tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import yaml

ADMIN = "crash-test-admin-token-0123"


class ProxyProcess:
    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        db_url: str | None = None,
        budgets: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        name: str = "meterproxy",
        extra: dict[str, Any] | None = None,
        **server: Any,
    ) -> None:
        self.workdir = workdir
        self.db = workdir / "ledger.db"
        self.config = workdir / f"{name}.yaml"
        self.args = args
        config: dict[str, Any] = {
            "server": {"port": 0, **server},
            "upstreams": [{"name": "fake", "base_url": upstream_url, "default": True}],
            "storage": {"url": db_url or f"sqlite:///{self.db}",
                        "spool_dir": str(workdir / f"{name}-spool")},
            "admin": {"token": ADMIN},
            "budgets": budgets or {"defaults": {"max_cost_per_day_usd": 1000}},
            "timeouts": {"stream_idle": 30},
        }  # fmt: skip
        for section, values in (extra or {}).items():
            config[section] = {**config.get(section, {}), **values}
        self.spool = workdir / f"{name}-spool"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(self.config), *self.args,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 30)).decode()
            if not line:
                raise AssertionError("proxy exited at startup:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        self._drain = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode())

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, seconds: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), seconds)
        if self._drain is not None:
            await asyncio.wait_for(self._drain, 5)
        return code

    def rows(self) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM calls")]
        finally:
            conn.close()

    @property
    def log(self) -> str:
        return "".join(self.lines)
