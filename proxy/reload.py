"""Hot reload of `pricing.yaml` and the config file, polled, and at once on SIGHUP.

A broken edit keeps what is in force and logs one ERROR naming file, line and problem
(once per broken version of the file, not once per poll).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from proxy.config import Config, ConfigError
from proxy.pricing import PricingError, load_price_table
from proxy.services import Services

log = logging.getLogger("meterproxy.reload")
_RESTART_ONLY = ("host", "port", "db_url", "sqlite_synchronous", "log_format", "log_file")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Reloader:
    def __init__(
        self,
        svc: Services,
        reparse: Callable[[], Config] | None = None,
    ) -> None:
        """`reparse` re-reads the config file with the command line's overrides applied."""
        self.svc = svc
        self.reparse = reparse
        self._pricing_sig = _signature(svc.config.pricing_path)
        self._config_sig = _signature(svc.config.path) if svc.config.path else None
        self._bad: set[tuple[str, object]] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.svc.config.reload_interval_seconds)
            try:
                await self.check()
            except Exception:
                log.exception("reload check failed")

    async def check(self, force: bool = False) -> None:
        config = self.svc.config
        if config.path is not None and self.reparse is not None:
            sig = _signature(config.path)
            if force or sig != self._config_sig:
                self._config_sig = sig
                await self._reload_config(sig)
        sig = _signature(self.svc.config.pricing_path)
        if force or sig != self._pricing_sig:
            self._pricing_sig = sig
            await self._reload_pricing(sig)

    async def _reload_pricing(self, sig: object) -> None:
        path = self.svc.config.pricing_path
        try:
            table = await asyncio.to_thread(load_price_table, path)
        except PricingError as e:
            self._error(("pricing", sig), f"pricing not reloaded, previous prices stay: {e}")
            return
        if table.version != self.svc.prices.version:
            self.svc.prices = table
            log.info("pricing reloaded from %s: version %s", path, table.version)

    async def _reload_config(self, sig: object) -> None:
        assert self.reparse is not None
        try:
            config = await asyncio.to_thread(self.reparse)
        except ConfigError as e:
            self._error(("config", sig), f"config not reloaded, previous config stays: {e}")
            return
        old = self.svc.config
        for name in _RESTART_ONLY:
            if getattr(old, name) != getattr(config, name):
                log.warning("config: %s changed; it takes effect after a restart", name)
        pricing_moved = config.pricing_path != old.pricing_path
        self.svc.apply_config(config)
        log.info("config reloaded from %s", config.path)
        if pricing_moved:
            self._pricing_sig = None

    def _error(self, key: tuple[str, object], message: str) -> None:
        if key not in self._bad:
            self._bad.add(key)
            log.error("%s", message)
