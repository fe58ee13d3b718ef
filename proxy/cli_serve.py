"""`meterproxy serve`: run the proxy until SIGTERM, then drain. Prints only through logging;
`cli` turns the errors it raises into exit codes."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError
from proxy.config_paths import CONFIG_ENV, CONFIG_NAME, ledger_path, preflight
from proxy.hosts import is_loopback_host
from proxy.logs import CONSOLE
from proxy.redact import redact_url

# Connections waiting to be accepted (the kernel caps it at net.core.somaxconn). aiohttp's
# default of 128 resets clients when a few thousand agents connect within seconds (the
# accept queue overflows while the loop is busy): 2,094 of 5,000 streams in bench.streams.
LISTEN_BACKLOG = 4096


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft limit on open files to the hard one: each open stream holds two
    sockets, and the usual soft limit (1,024) would refuse the 513th concurrent stream
    with "Too many open files". Returns (before, now)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return (soft, want)
        except (ValueError, OSError):
            pass
    return (soft, soft)


log = logging.getLogger("meterproxy")


def serve(config: Config, args: argparse.Namespace, reparse: Callable[[], Config]) -> int:
    """Run the proxy; raises ConfigError for what stops it from starting."""
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and not config.db_url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"--workers {args.workers} needs PostgreSQL (storage.url or --db postgresql://...):"
            f" with SQLite ({redact_url(config.db_url)}) budgets live in one process, and"
            " several workers would each enforce their own"
        )
    if args.workers > 1 and config.port == 0:
        raise ConfigError("--workers needs a fixed port (server.port or --port), not 0")
    problems = preflight(config)
    if problems:
        raise ConfigError(*problems)
    from proxy.logs import setup_logging
    from proxy.workers import supervise, worker_number

    handler = setup_logging(config.log_format, config.log_file, config.log_level)
    if args.workers > 1 and worker_number() is None:
        return supervise(args.workers, args.argv)
    if not is_loopback_host(config.host) and not config.keys and config.admin_token is None:
        log.warning(
            "listening on %s without proxy keys or an admin token: anyone who can reach this"
            " port can spend through it",
            config.host,
        )
    _before, open_files = raise_open_files_limit()
    if 0 < open_files < 4096:
        log.warning(
            "the open-files limit is %d (ulimit -Hn): about %d streams can be open at once;"
            " raise it for more",
            open_files,
            open_files // 2 - 50,
        )
    loop_factory = None
    if config.event_loop != "asyncio":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass  # preflight refused `uvloop` without it: this is `auto`
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(config, args, handler, reparse))
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e.strerror}") from None


def _where(config: Config) -> str:
    if config.path is None:
        return (f"no config file (defaults; looked for --config, ${CONFIG_ENV},"
                f" ./{CONFIG_NAME})")  # fmt: skip
    return f"config {config.path} (from {config.found_by or '--config'})"


async def _serve(
    config: Config, args: argparse.Namespace, handler: Any, reparse: Callable[[], Config]
) -> int:
    from aiohttp import web

    from proxy.app import RELOADER, Options, create_app, runner_options
    from proxy.services import SERVICES
    from proxy.workers import worker_number

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # first SIGTERM/SIGINT: drain, then exit
    force = asyncio.Event()  # second one: cancel what is left now
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: force.set() if stop.is_set() else stop.set())

    ledger = ledger_path(config.db_url)
    log.info("%s; ledger %s%s", _where(config),
             ledger if ledger is not None else redact_url(config.db_url),
             "" if ledger is None or ledger.exists() else " (new)", extra=CONSOLE)  # fmt: skip
    app = create_app(config, Options(reparse=reparse, call_sink=handler.call_sink()))
    runner = web.AppRunner(app, handle_signals=False, **runner_options(config))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=LISTEN_BACKLOG,
                       reuse_port=args.workers > 1 or None)  # fmt: skip
    await site.start()
    loop.add_signal_handler(
        signal.SIGHUP, lambda: asyncio.ensure_future(app[RELOADER].check(force=True))
    )
    flusher = asyncio.create_task(handler.flush_periodically())
    # What startup built (price table, tokenizer, modules) lives as long as the process:
    # out of the collector's way. A call's garbage is freed by reference counting; the
    # cycle collector need not wake every 700 allocations, several times per call. But a
    # young generation-1 pass scans what 10 generation-0 passes kept (up to 200,000
    # objects, about 100 ms here): at 50, with 9,800 streams opening, one pass took 450 ms
    # and every stream's chunks waited for it.
    gc.freeze()
    gc.set_threshold(20_000, 10, 100)
    svc = app[SERVICES]
    host, port = runner.addresses[0][:2]
    worker = worker_number()
    log.info(
        "meterproxy %s%s listening on http://%s:%d (upstream %s, pricing %s %s)",
        __version__,
        f" worker {worker}/{args.workers} (pid {os.getpid()})" if worker else "",
        host,
        port,
        config.default_upstream.base_url,
        config.pricing_path,
        svc.prices.version,
        extra=CONSOLE,
    )
    await stop.wait()

    # Stop accepting; close idle keep-alive connections; let calls in flight finish.
    await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    grace = svc.config.shutdown_grace_seconds  # it reloads
    log.info("stopping: waiting up to %gs for %d calls in flight", grace, len(svc.inflight),
             extra=CONSOLE)  # fmt: skip
    deadline = loop.time() + grace
    svc.stop_deadline = time.monotonic() + grace
    while svc.inflight and not force.is_set() and loop.time() < deadline:
        forced = asyncio.ensure_future(force.wait())
        await asyncio.wait(
            [*svc.inflight, forced],
            timeout=deadline - loop.time(),
            return_when=asyncio.FIRST_COMPLETED,
        )
        forced.cancel()
    if svc.inflight:
        why = "second signal" if force.is_set() else f"grace of {grace:g}s over"
        log.warning("%s: cancelling %d calls in flight (they are recorded)", why, len(svc.inflight))
        svc.shutting_down = True
        pending = list(svc.inflight)
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5)
    await runner.cleanup()  # the ledger writer flushes here
    flusher.cancel()
    log.info("stopped", extra=CONSOLE)
    handler.flush()
    return 0
