"""Where things are: the config file (found by flag, environment, or the current
directory), the ledger (relative to the config file), and what `serve` would trip over
once the file is read (`preflight`, run by `check` too)."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.config import Config
from proxy.pricing import PricingError, load_price_table

CONFIG_ENV = "METERPROXY_CONFIG"
CONFIG_NAME = "meterproxy.yaml"
PRICING_NAME = "pricing.yaml"
LEDGER_NAME = "meterproxy.db"


def find_config(given: str | None, cwd: Path | None = None) -> tuple[Path | None, str | None]:
    """The config file to use and how it was found: `--config`, then $METERPROXY_CONFIG,
    then ./meterproxy.yaml. (None, None): no file, every default."""
    if given:
        return Path(given), "--config"
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env), f"${CONFIG_ENV}"
    here = (cwd or Path.cwd()) / CONFIG_NAME
    if here.is_file():
        return here, f"./{CONFIG_NAME}"
    return None, None


def resolve_ledger(url: str, base: Path) -> str:
    """A SQLite ledger's path made absolute against `base`; other URLs as they are."""
    if url.startswith(("postgresql://", "postgres://")) or url == ":memory:":
        return url
    path = url[len("sqlite://") :] if url.startswith("sqlite://") else url
    if url.startswith("sqlite://"):
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
    if path == ":memory:":
        return url
    return "sqlite:///" + str((base / Path(path).expanduser()).resolve())


def ledger_path(url: str) -> Path | None:
    """The file of a SQLite ledger URL (None: PostgreSQL, or in memory)."""
    if url.startswith(("postgresql://", "postgres://")) or ":memory:" in url:
        return None
    path = url[len("sqlite://") :] if url.startswith("sqlite://") else url
    if url.startswith("sqlite://") and path.startswith("/"):
        path = path[1:]
    return Path(path)


def preflight(config: Config) -> list[str]:
    """What would stop `serve` after the file parsed: the price table, the ledger's and
    the log's directories, the event loop. `check` and `serve` both run it."""
    problems = []
    try:
        load_price_table(config.pricing_path)
    except PricingError as e:
        problems.append(str(e))
    where = str(config.path) if config.path else "(no config file)"
    ledger = ledger_path(config.db_url)
    if ledger is not None and not ledger.parent.is_dir():
        problems.append(f"{where}: key 'storage.url': the ledger's directory {ledger.parent}"
                        " does not exist")  # fmt: skip
    if config.log_file is not None and not config.log_file.parent.is_dir():
        problems.append(f"{where}: key 'logging.file': the directory {config.log_file.parent}"
                        " does not exist")  # fmt: skip
    if config.event_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            problems.append(f"{where}: key 'server.event_loop': is uvloop, but uvloop is not"
                            " installed (pip install uvloop, or set auto)")  # fmt: skip
    return problems
