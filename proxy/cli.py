"""The `meterproxy` command. The only module that prints and exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, load_config
from proxy.hosts import is_loopback_host
from proxy.pricing import PricingError, load_price_table
from proxy.redact import redact_url
from proxy.storage import StorageError

log = logging.getLogger("meterproxy")
EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"meterproxy: {message}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    overrides: dict[str, Any] = {}
    for name, field in (("host", "host"), ("port", "port"), ("db", "db_url")):
        value = getattr(args, name, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "pricing", None):
        overrides["pricing_path"] = Path(args.pricing)
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    return config.with_overrides(**overrides)


# -- serve ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.workers < 1:
        return _fail(f"--workers must be at least 1, got {args.workers}")
    if args.workers > 1 and not config.db_url.startswith(("postgresql://", "postgres://")):
        return _fail(
            f"--workers {args.workers} needs PostgreSQL (storage.url or --db postgresql://...):"
            f" with SQLite ({redact_url(config.db_url)}) budgets live in one process, and"
            " several workers would each enforce their own"
        )
    if args.workers > 1 and config.port == 0:
        return _fail("--workers needs a fixed port (server.port or --port), not 0")
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
    loop_factory = None
    if config.event_loop != "asyncio":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            if config.event_loop == "uvloop":
                return _fail("server.event_loop is uvloop, but uvloop is not installed")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(config, args, handler))
    except (PricingError, StorageError, ConfigError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot listen on {config.host}:{config.port}: {e.strerror}")


async def _serve(config: Config, args: argparse.Namespace, handler: Any) -> int:
    from aiohttp import web

    from proxy.app import RELOADER, Options, create_app, runner_options
    from proxy.services import SERVICES
    from proxy.workers import worker_number

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # first SIGTERM/SIGINT: drain, then exit
    force = asyncio.Event()  # second one: cancel what is left now
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: force.set() if stop.is_set() else stop.set())

    app = create_app(config, Options(reparse=lambda: _config(args), call_sink=handler.call_sink()))
    runner = web.AppRunner(app, handle_signals=False, **runner_options(config))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_port=args.workers > 1 or None)
    await site.start()
    loop.add_signal_handler(
        signal.SIGHUP, lambda: asyncio.ensure_future(app[RELOADER].check(force=True))
    )
    flusher = asyncio.create_task(handler.flush_periodically())
    # What startup built (price table, tokenizer, modules) lives as long as the process:
    # out of the collector's way. A call's garbage is freed by reference counting; the
    # cycle collector need not wake every 700 allocations, several times per call.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    svc = app[SERVICES]
    host, port = runner.addresses[0][:2]
    worker = worker_number()
    log.info(
        "meterproxy %s%s listening on http://%s:%d (upstream %s, pricing %s, ledger %s)",
        __version__,
        f" worker {worker}/{args.workers} (pid {os.getpid()})" if worker else "",
        host,
        port,
        config.default_upstream.base_url,
        svc.prices.version,
        redact_url(config.db_url),
    )
    await stop.wait()

    # Stop accepting; close idle keep-alive connections; let calls in flight finish.
    await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    grace = config.shutdown_grace_seconds
    log.info("stopping: waiting up to %gs for %d calls in flight", grace, len(svc.inflight))
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
    log.info("stopped")
    handler.flush()
    return 0


# -- check, report, price, pricing import ----------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    table = load_price_table(config.pricing_path)
    where = args.config or "(no config file: defaults)"
    print(
        f"config {where}: OK; {len(config.upstreams)} upstream(s),"
        f" {len(config.policies.agents)} agent policies;"
        f" pricing {config.pricing_path}: OK, version {table.version},"
        f" {len(table.models)} models, {len(table.aliases)} aliases"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    config = _config(args)
    return asyncio.run(_report(config, args))


async def _report(config: Config, args: argparse.Namespace) -> int:
    import time

    from proxy.reports import ReportError, parse_time, spend_report
    from proxy.storage import open_storage
    from proxy.windows import Calendar

    calendar = Calendar(config.timezone)
    now = time.time()
    try:
        since = parse_time(args.since, calendar, now, "--since") if args.since else None
        until = parse_time(args.until, calendar, now, "--until") if args.until else None
    except ReportError as e:
        return _fail(str(e))
    storage = await open_storage(config.db_url, sqlite_synchronous=config.sqlite_synchronous)
    try:
        report = await spend_report(
            storage, calendar, by=args.by, window=args.window, since=since, until=until,
            agent=args.agent,
        )  # fmt: skip
    except ReportError as e:
        return _fail(str(e))
    finally:
        await storage.close()
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2))
    elif args.format == "csv":
        sys.stdout.write(report.to_csv())
    else:
        print(report.to_table())
    return 0


def cmd_price(args: argparse.Namespace) -> int:
    from proxy.money import usd_exact
    from proxy.usage import Usage

    config = _config(args)
    table = load_price_table(config.pricing_path)
    price = table.resolve(args.model)
    if price is None:
        return _fail(f"model '{args.model}' has no price in {config.pricing_path}", 1)
    usage = Usage(
        input_tokens=args.input,
        cached_input_tokens=args.cached,
        output_tokens=args.output,
        reasoning_tokens=args.reasoning,
        service_tier=args.tier,
    )
    if args.cached > args.input or args.reasoning > args.output:
        return _fail("--cached cannot exceed --input, nor --reasoning --output", 1)
    rates = price.rates_for(args.tier, args.input)

    def per_m(pico: int) -> str:
        return f"${Decimal(pico) / 10**6:f}/1M"

    print(f"{args.model} -> {price.name} ({price.provider}), prices {table.version}")
    print(
        f"  input  {args.input - args.cached} x {per_m(rates.input)}"
        f" + cached {args.cached} x {per_m(rates.cached_input)}"
    )
    print(f"  output {args.output} x {per_m(rates.output)} (reasoning {args.reasoning})")
    print(f"  cost   ${usd_exact(price.cost(usage))}")
    return 0


def cmd_pricing_import(args: argparse.Namespace) -> int:
    from proxy.pricing_import import ImportError_, import_litellm

    try:
        text, summary = import_litellm(
            Path(args.file), providers=args.provider.split(",") if args.provider else None
        )
    except ImportError_ as e:
        return _fail(str(e))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(summary, file=sys.stderr)
    else:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
    return 0


# -- agents, pause, resume: through the running proxy's admin API -----------------------


def _admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    config = _config(args)
    token = args.token or os.environ.get("METERPROXY_ADMIN_TOKEN") or config.admin_token
    if not token:
        raise ConfigError("no admin token: pass --token, set METERPROXY_ADMIN_TOKEN or admin.token")
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    base = args.url or f"http://{host}:{config.port}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base.rstrip("/") + path, data=data, method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise ConfigError(f"{method} {path}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise ConfigError(f"cannot reach the proxy at {base}: {e.reason}") from None


def _print_agent(status: dict[str, Any]) -> None:
    day = status["windows"]["day"]
    limits = ", ".join(
        f"{lim['limit']}={lim.get('limit_usd', lim.get('max'))}"
        f" (left {lim.get('remaining_usd', lim.get('remaining'))})"
        for lim in status["limits"]
    )
    print(
        f"{status['agent']:<30} {status['state']:<7} today ${day['spent_usd']}"
        f" (+${day['reserved_usd']} reserved)  {limits or 'no limits'}"
    )


def cmd_agents(args: argparse.Namespace) -> int:
    for status in _admin_call(args, "GET", "/meter/agents")["agents"]:
        _print_agent(status)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _print_agent(
        _admin_call(args, "POST", f"/meter/agents/{args.agent}/pause", {"reason": args.reason})
    )
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    _print_agent(_admin_call(args, "POST", f"/meter/agents/{args.agent}/resume", {}))
    return 0


# -- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterproxy",
        description="OpenAI-compatible metering proxy: per-agent cost, budgets enforced"
        " before the call.",
    )
    parser.add_argument("--version", action="version", version=f"meterproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="config file (YAML); default: built-in defaults")
        p.add_argument("--pricing", help="price table (default: the bundled pricing.yaml)")
        p.add_argument("--db", help="ledger: a path, sqlite:///path or postgresql://...")

    p = sub.add_parser("serve", help="run the proxy")
    common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--log-format", choices=("text", "json"))
    p.add_argument("--workers", type=int, default=1, help="processes on one port (PostgreSQL)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate the config and the price table")
    common(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="spend from the ledger")
    common(p)
    p.add_argument("--by", default="agent",
                   help="agent, intent, model, upstream, provider, user, or tag:KEY")  # fmt: skip
    p.add_argument("--window", choices=("hour", "day", "week", "month"))
    p.add_argument("--since", help="2026-11-01, 2026-11-01T09:00, 7d, 24h ...")
    p.add_argument("--until")
    p.add_argument("--agent")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("price", help="what a call would cost")
    common(p)
    p.add_argument("model")
    p.add_argument("--input", type=int, required=True)
    p.add_argument("--output", type=int, required=True)
    p.add_argument("--cached", type=int, default=0)
    p.add_argument("--reasoning", type=int, default=0)
    p.add_argument("--tier", choices=("priority", "flex"))
    p.set_defaults(func=cmd_price)

    p = sub.add_parser("pricing", help="price table tools")
    psub = p.add_subparsers(dest="pricing_command", required=True)
    pi = psub.add_parser("import", help="convert a LiteLLM price JSON into pricing.yaml format")
    pi.add_argument("file")
    pi.add_argument("--output", "-o", help="write here instead of stdout")
    pi.add_argument("--provider", help="only these litellm_provider values, comma-separated")
    pi.set_defaults(func=cmd_pricing_import)

    for name, func, help_ in (
        ("agents", cmd_agents, "agents, their spend and limits (running proxy)"),
        ("pause", cmd_pause, "pause an agent (running proxy)"),
        ("resume", cmd_resume, "resume a paused agent (running proxy)"),
    ):
        p = sub.add_parser(name, help=help_)
        common(p)
        p.add_argument("--url", help="the proxy, default http://<server.host>:<server.port>")
        p.add_argument(
            "--token", help="admin token (default: $METERPROXY_ADMIN_TOKEN, admin.token)"
        )
        if name != "agents":
            p.add_argument("agent")
        if name == "pause":
            p.add_argument("--reason")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        result: int = args.func(args)
        return result
    except (ConfigError, PricingError, StorageError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
