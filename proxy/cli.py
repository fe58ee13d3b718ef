"""The `meterproxy` command. The only module that prints and exits."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import Config, ConfigError, Upstream
from proxy.config_file import load_config
from proxy.config_paths import (
    CONFIG_ENV,
    CONFIG_NAME,
    find_config,
    ledger_path,
    preflight,
    resolve_ledger,
)
from proxy.pricing import PricingError, load_price_table
from proxy.storage import StorageError

EXIT_CONFIG = 2


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    for line in message.splitlines() or [""]:
        print(f"meterproxy: {line}", file=sys.stderr)
    return code


def _config(args: argparse.Namespace, *, every_error: bool = False) -> Config:
    """The config in force: the file found (--config, $METERPROXY_CONFIG, ./meterproxy.yaml)
    with the command line's overrides. Paths given on the command line are relative to
    the current directory; those in the file, to the file."""
    path, found_by = find_config(getattr(args, "config", None))
    config = load_config(path, every_error=every_error, found_by=found_by)
    overrides: dict[str, Any] = {}
    for name in ("host", "port"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "db", None):
        overrides["db_url"] = resolve_ledger(args.db, Path.cwd())
    if getattr(args, "pricing", None):
        overrides["pricing_path"] = Path(args.pricing).resolve()
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    if getattr(args, "upstream", None):
        overrides["upstreams"] = _with_upstream(config, args.upstream)
    return config.with_overrides(**overrides)


def _with_upstream(config: Config, url: str) -> tuple[Upstream, ...]:
    """--upstream URL: the default upstream's base URL replaced (its key kept)."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"--upstream: bad value {url!r}: must be an http:// or https:// URL")
    default = config.default_upstream
    return tuple(
        Upstream(u.name, url.rstrip("/"), u.api_key, u.models, True, u.inject_usage,
                 u.provider, u.deployments, u.default_service_tier)
        if u is default else u
        for u in config.upstreams
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.cli_serve import serve

    return serve(_config(args), args, lambda: _config(args))


def cmd_init(args: argparse.Namespace) -> int:
    from proxy.init_config import guess_provider, new_admin_token, render_config

    target = Path(args.output or CONFIG_NAME)
    if target.exists() and not args.force:
        return _fail(f"{target} exists; pass --force to overwrite it")
    if not re.match(r"^https?://[^/\s]+", args.upstream):
        return _fail(f"--upstream: bad value {args.upstream!r}: must be an http(s):// URL")
    provider = args.provider or guess_provider(args.upstream)
    text = render_config(args.upstream, provider, new_admin_token(), args.port)
    target.write_text(text, encoding="utf-8")
    target.chmod(0o600)  # it holds the admin token
    config = load_config(target, every_error=True)  # what init writes must pass check
    problems = preflight(config)
    if problems:
        return _fail("\n".join(problems))
    where = "" if target.resolve().parent == Path.cwd().resolve() else f" --config {target}"
    print(f"wrote {target} (upstream {args.upstream}, provider {provider}, admin token inside)")
    print(f"next: meterproxy serve{where}")
    return 0


# -- check, report, price, pricing import ----------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """The same validation as `serve`, all of it, and every error found, not the first."""
    problems: list[str] = []
    try:
        config = _config(args, every_error=True)
    except ConfigError as e:
        problems += e.lines
        if e.partial is None:  # unreadable, or not YAML: nothing more to check
            return _fail("\n".join(problems))
        config = e.partial
    problems += preflight(config)
    if problems:
        return _fail("\n".join(problems))
    table = load_price_table(config.pricing_path)
    where = f"{config.path} (from {config.found_by})" if config.path else (
        f"none (defaults; looked for --config, ${CONFIG_ENV}, ./{CONFIG_NAME})")  # fmt: skip
    print(
        f"config {where}: OK; {len(config.upstreams)} upstream(s),"
        f" {len(config.policies.agents)} agent policies;"
        f" pricing {config.pricing_path}: OK, version {table.version},"
        f" {len(table.models)} models, {len(table.aliases)} aliases;"
        f" ledger {ledger_path(config.db_url) or config.db_url.split('@')[-1]}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    config = _config(args)
    ledger = ledger_path(config.db_url)
    if ledger is not None and not ledger.is_file():
        # Reading must never create a ledger: an empty new one would print a $0 report.
        where = f"config {config.path}" if config.path else "no config file"
        return _fail(f"no ledger at {ledger} ({where}; set storage.url, pass --db, or"
                     f" --config / ${CONFIG_ENV} to the proxy's config)")  # fmt: skip
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
    if args.outcomes:
        from proxy.outcomes import outcome_report

        try:
            outcomes = await outcome_report(storage, args.by, since, until, args.agent)
        except ReportError as e:
            return _fail(str(e))
        finally:
            await storage.close()
        print(json.dumps(outcomes.to_json(), indent=2) if args.format == "json"
              else outcomes.to_csv() if args.format == "csv" else outcomes.to_table())  # fmt: skip
        return 0
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


def cmd_agents(args: argparse.Namespace) -> int:
    from proxy.cli_admin import agents

    for line in agents(_config(args), args):
        print(line)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from proxy.cli_admin import pause

    print(pause(_config(args), args))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from proxy.cli_admin import resume

    print(resume(_config(args), args))
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
        p.add_argument("--config", "-c", help=f"config file (YAML); default: ${CONFIG_ENV},"
                       f" else ./{CONFIG_NAME}, else built-in defaults")  # fmt: skip
        p.add_argument("--pricing", help="price table (default: pricing.yaml beside the config"
                       " file, else the bundled one)")  # fmt: skip
        p.add_argument("--db", help="ledger: a path, sqlite:///path or postgresql://...")

    p = sub.add_parser("init", help="write a commented meterproxy.yaml for an upstream")
    p.add_argument("--upstream", required=True, help="the provider or gateway to forward to")
    p.add_argument("--provider", choices=("openai", "anthropic", "azure", "gemini"),
                   help="the API it speaks (default: guessed from the URL)")  # fmt: skip
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--output", "-o", help=f"where to write (default ./{CONFIG_NAME})")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("serve", help="run the proxy")
    common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--upstream", help="forward to this URL (the default upstream's base_url)")
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
    p.add_argument("--outcomes", action="store_true",
                   help="intents by outcome, cost per success (--by agent|model)")  # fmt: skip
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
            p.add_argument("--force", action="store_true",
                           help="pause an agent that never called and has no policy")  # fmt: skip
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
