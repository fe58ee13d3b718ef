"""Hot reload of `pricing.yaml` and the config file, polled, and at once on SIGHUP.

A broken edit keeps what is in force and logs one ERROR naming file, line and problem
(once per broken version of the file, not once per poll).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from proxy.config import Config, ConfigError
from proxy.pricing import PricingError, load_price_table
from proxy.services import Services

log = logging.getLogger("meterproxy.reload")

# What a reload does with each config key. `live`: read from the config in force at each
# use, so the new value applies to the next call. `applied`: rebuilt by
# `Services.apply_config`. `restart`: fixed when the process started; a change is logged
# as a WARNING naming the key. A test checks that every field of Config is listed here.
LIVE, APPLIED, RESTART = "live", "applied", "restart"
RULES: dict[str, str] = {
    "path": RESTART, "found_by": RESTART,
    "host": RESTART, "port": RESTART, "max_body_bytes": RESTART, "keepalive_timeout": RESTART,
    "event_loop": RESTART, "shutdown_grace_seconds": LIVE, "body_timeout": LIVE,
    "allowed_origins": LIVE, "allowed_hosts": LIVE,
    "upstreams": LIVE, "timeouts.connect": LIVE, "timeouts.read": LIVE,
    "timeouts.stream_idle": LIVE,
    "pricing_path": APPLIED, "unknown_model": LIVE, "reload_interval_seconds": LIVE,
    "db_url": RESTART, "sqlite_synchronous": RESTART, "retention_days": LIVE,
    "on_storage_error": APPLIED, "spool_dir": RESTART, "pool_size": RESTART,
    "commit_timeout": APPLIED, "stall_seconds": APPLIED,
    "agent_header": LIVE, "intent_header": LIVE, "default_agent": LIVE, "user_header": LIVE,
    "user_from_body": LIVE, "hash_users": LIVE, "user_hash_salt": LIVE, "tags_header": LIVE,
    "keys": APPLIED, "admin_token": LIVE, "metrics_need_token": LIVE,
    "log_format": RESTART, "log_file": RESTART, "log_level": APPLIED,
    "timezone": RESTART,
    "reserve_output_tokens": LIVE, "reserve_input_margin": LIVE, "reserve_input_margins": LIVE,
    "on_uncapped": LIVE, "clamp_share": LIVE, "unpriced": LIVE, "unknown_chain": LIVE,
    "background_max_seconds": LIVE, "policies": APPLIED,
    "alerts.webhooks": APPLIED, "alerts.thresholds": APPLIED, "alerts.repeat_seconds": APPLIED,
    "alerts.upstream_failures": APPLIED, "alerts.runway_seconds": APPLIED,
    "alerts.queue_size": RESTART,
    "heartbeat_enabled": LIVE, "heartbeat_max_cost_pico": LIVE, "telemetry": RESTART,
}  # fmt: skip
# The names people write in the file, for the WARNING.
_FILE_KEYS = {
    "path": "--config", "found_by": "--config", "db_url": "storage.url",
    "sqlite_synchronous": "storage.sqlite_synchronous", "spool_dir": "storage.spool_dir",
    "pool_size": "storage.pool_size", "log_format": "logging.format", "log_file": "logging.file",
    "timezone": "budgets.timezone", "alerts.queue_size": "alerts.queue_size",
    "telemetry": "telemetry",
}  # fmt: skip


def value_of(config: Config, name: str) -> object:
    obj: object = config
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def restart_changes(old: Config, new: Config) -> list[str]:
    """The restart-only keys whose value changed, as the file spells them."""
    return [
        _FILE_KEYS.get(name, f"server.{name}")
        for name, rule in RULES.items()
        if rule == RESTART and name not in ("path", "found_by")
        and value_of(old, name) != value_of(new, name)
    ]  # fmt: skip


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def keep_restart_values(old: Config, new: Config) -> Config:
    """The new config with the values in force kept where only a restart can change them:
    the config shown and used is the one actually running."""
    top = {n: getattr(old, n) for n, rule in RULES.items() if rule == RESTART and "." not in n}
    alerts = replace(new.alerts, queue_size=old.alerts.queue_size)
    return replace(new, **top, alerts=alerts)


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
        for key in restart_changes(old, config):
            log.warning("config: %s changed; it takes effect after a restart (until then the"
                        " old value stays)", key)  # fmt: skip
        pricing_moved = config.pricing_path != old.pricing_path
        self.svc.apply_config(keep_restart_values(old, config))
        log.info("config reloaded from %s", config.path)
        if pricing_moved:
            self._pricing_sig = None

    def _error(self, key: tuple[str, object], message: str) -> None:
        if key not in self._bad:
            self._bad.add(key)
            log.error("%s", message)
