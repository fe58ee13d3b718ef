"""Reading the config file: where it is, and its YAML parsed into a `Config`.

Every bad value is an error naming the file, the line, the key and the value. `serve`
stops at the first one; `meterproxy check` reads on past each and reports them all (a
`Section` with a sink). Relative paths (ledger, price table, spool, log file) resolve
against the directory of the config file, never the current directory: a command run
from elsewhere reads the same ledger as the proxy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from proxy.attribution import user_digest
from proxy.bounds import MAX_HEARTBEAT_USD, MAX_TOKENS
from proxy.config import (
    IMPLICIT_UPSTREAMS,
    PROVIDERS,
    TOP_KEYS,
    AlertsConfig,
    Config,
    ConfigError,
    TelemetryConfig,
    Timeouts,
    Upstream,
)
from proxy.config_paths import LEDGER_NAME, PRICING_NAME, resolve_ledger
from proxy.ids import IdError, validate_id
from proxy.money import usd_to_pico
from proxy.policy import parse_policies
from proxy.pricing import bundled_pricing_path
from proxy.schema import MISSING, FieldError, Section, yaml_line

_URL = re.compile(r"^https?://[^/\s]+")


# -- the sections ------------------------------------------------------------------------


def _upstream(s: Section, names: set[str]) -> Upstream:
    s.check_unknown(("name", "base_url", "api_key", "models", "default", "inject_usage",
                     "provider", "deployments", "default_service_tier"))  # fmt: skip
    name = s.string("name")
    if name in names:
        s.fail("name", "is used by another upstream")
    names.add(name)
    base_url = s.string("base_url").rstrip("/")
    if not _URL.match(base_url):
        s.fail("base_url", "must be an http:// or https:// URL")
    models: tuple[str, ...] = tuple(s.strings("models"))
    provider = s.choice("provider", PROVIDERS, "openai")
    if provider in ("anthropic", "gemini", "azure") and base_url.endswith(("/v1", "/v1beta")):
        s.fail("base_url", f"for provider {provider}, give the root URL (e.g."
               f" {IMPLICIT_UPSTREAMS.get(provider, 'https://NAME.openai.azure.com')}):"
               " the API version comes from the client's path")  # fmt: skip
    deployments = s.section("deployments")
    pairs = []
    for dep, model in deployments.data.items():
        if not isinstance(model, str) or not model:
            deployments.fail(str(dep), "must name the model the deployment serves")
        pairs.append((str(dep), model))
    if pairs and provider != "azure":
        s.fail("deployments", "only Azure upstreams (provider: azure) have deployments")
    tier = s.choice("default_service_tier", ("default", "priority", "flex"), "default")
    api_key = s.string("api_key", None, env=True)
    if isinstance(api_key, str) and not api_key.isprintable():
        # It goes into a request header, which a line break would end early: refused
        # here, once, rather than on every call. The key itself is never shown.
        reason = ("holds a line break or another control character (a key read from a file"
                  " often ends in a newline)")  # fmt: skip
        s.report(s.error("api_key", MISSING, reason))
    return Upstream(
        name=name,
        base_url=base_url,
        api_key=api_key,
        models=models,
        default=s.boolean("default", False),
        inject_usage=s.boolean("inject_usage", True),
        provider=provider,
        deployments=tuple(pairs),
        default_service_tier=None if tier == "default" else tier,
    )


def _upstreams(top: Section) -> dict[str, Any]:
    items = top.sequence("upstreams")
    if not items:
        return {}
    upstreams = []
    names: set[str] = set()
    for i, item in enumerate(items):
        section = top.item("upstreams", i, item)
        upstream = _guarded(top, partial(_upstream, section, names))
        if upstream is not None:
            upstreams.append(upstream)
    if sum(u.default for u in upstreams) > 1:
        raise FieldError("upstreams", "(several)", "only one upstream can be the default")
    return {"upstreams": tuple(upstreams)} if upstreams else {}


def _keys(top: Section) -> dict[str, Any]:
    keys = top.section("keys")
    out = {}
    for key, agent in keys.data.items():
        shown = f"{str(key)[:4]}..."  # never print a key in full
        if not isinstance(key, str) or len(key) < 8:
            raise FieldError(f"keys.{shown}", MISSING, "a proxy key must be at least 8 characters")
        if isinstance(agent, dict):
            agent = Section(agent, ("keys", shown)).string("agent")
        if not isinstance(agent, str):
            raise FieldError(f"keys.{shown}", agent, "must map to an agent name")
        try:
            validate_id(agent, "agent")
        except IdError as e:
            raise FieldError(f"keys.{shown}", agent, e.reason) from None
        out[key] = agent
    return {"keys": out}


def _keys_need_upstream_keys(top: Section, parsed: dict[str, Any]) -> None:
    if not parsed.get("keys"):
        return
    if not top.sequence("upstreams"):
        raise FieldError("upstreams", None, "proxy keys need upstreams with an api_key each")
    for i, upstream in enumerate(parsed.get("upstreams", ())):
        if upstream.api_key is None:
            raise FieldError(
                f"upstreams[{i}].api_key",
                MISSING,
                "is required when proxy keys are configured (the client's key is a proxy"
                " key and must not reach the provider)",
                ("upstreams", i, "api_key"),
            )


def _server(top: Section) -> dict[str, Any]:
    server = top.section("server")
    server.check_unknown(
        ("host", "port", "max_body_bytes", "shutdown_grace_seconds", "keepalive_timeout",
         "body_timeout", "event_loop", "allowed_origins", "allowed_hosts")
    )  # fmt: skip
    origins = []
    for i, origin in enumerate(server.strings("allowed_origins")):
        o = origin.strip().lower().rstrip("/")
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
            server.report(FieldError(
                f"server.allowed_origins[{i}]",
                origin,
                "must be an origin like https://app.example.com (scheme, host, optional port;"
                " no path) or *",
                ("server", "allowed_origins", i),
            ))  # fmt: skip
            continue
        origins.append(o)
    hosts = server.strings("allowed_hosts") if server.has("allowed_hosts") else None
    return {
        "host": server.string("host", "127.0.0.1"),
        "port": server.integer("port", 8787, min=0, max=65535),
        "max_body_bytes": server.integer("max_body_bytes", Config.max_body_bytes, min=1024),
        "shutdown_grace_seconds": server.number("shutdown_grace_seconds", 30.0, min=0),
        "keepalive_timeout": server.number("keepalive_timeout", 75.0, min=0.01),
        "body_timeout": server.number("body_timeout", 60.0, min=0.01),
        "event_loop": server.choice("event_loop", ("auto", "uvloop", "asyncio"), "auto"),
        "allowed_origins": tuple(origins),
        "allowed_hosts": tuple(h.strip().lower() for h in hosts) if hosts is not None else None,
    }


def _timeouts(top: Section) -> dict[str, Any]:
    timeouts = top.section("timeouts")
    timeouts.check_unknown(("connect", "read", "stream_idle"))
    return {
        "timeouts": Timeouts(
            connect=timeouts.number("connect", 10.0, min=0.001),
            read=timeouts.number("read", 600.0, min=0.001),
            stream_idle=timeouts.number("stream_idle", 300.0, min=0.001),
        )
    }


def _pricing(top: Section, base: Path) -> dict[str, Any]:
    pricing = top.section("pricing")
    pricing.check_unknown(("file", "unknown_model", "reload_interval_seconds"))
    name = pricing.string("file", None)
    if name is not None:
        path = base / Path(name).expanduser()
        if not path.is_file():
            pricing.fail("file", f"no such file ({path})")
    elif (base / PRICING_NAME).is_file():
        # A pricing.yaml beside the config file (or in the current directory, without one)
        # is the table people edit: it wins over the bundled copy.
        path = base / PRICING_NAME
    else:
        path = bundled_pricing_path()
    return {
        "pricing_path": path.resolve() if path != bundled_pricing_path() else path,
        "unknown_model": pricing.choice("unknown_model", ("allow", "block"), "allow"),
        "reload_interval_seconds": pricing.number("reload_interval_seconds", 1.0, min=0.01),
    }


def _storage(top: Section, base: Path) -> dict[str, Any]:
    storage = top.section("storage")
    storage.check_unknown(
        ("url", "sqlite_synchronous", "retention_days", "on_storage_error", "spool_dir",
         "pool_size", "commit_timeout_seconds", "stall_seconds")
    )  # fmt: skip
    url = storage.string("url", f"sqlite:///{LEDGER_NAME}", env=True)
    if "://" in url and not url.startswith(("sqlite://", "postgresql://", "postgres://")):
        storage.report(storage.error(
            "url", url.split("://")[0] + "://...",
            "must be sqlite:///PATH (relative to the config file), sqlite:////ABSOLUTE/PATH,"
            " a plain path, or postgresql://USER@HOST:PORT/DB",
        ))  # fmt: skip
        url = f"sqlite:///{LEDGER_NAME}"
    spool_dir = storage.string("spool_dir", None)
    return {
        "db_url": resolve_ledger(url, base),
        "sqlite_synchronous": storage.choice("sqlite_synchronous", ("NORMAL", "FULL"), "NORMAL"),
        "retention_days": storage.integer("retention_days", None, min=1),
        "on_storage_error": storage.choice("on_storage_error", ("closed", "open"), "closed"),
        "spool_dir": (base / spool_dir) if spool_dir else (base / Config.spool_dir),
        "pool_size": storage.integer("pool_size", 10, min=1, max=1000),
        "commit_timeout": storage.number("commit_timeout_seconds", 5.0, min=0.01, max=3600),
        "stall_seconds": storage.number("stall_seconds", 10.0, min=0.1, max=86400),
    }


def _attribution(top: Section) -> dict[str, Any]:
    attribution = top.section("attribution")
    attribution.check_unknown(
        ("agent_header", "intent_header", "default_agent", "user_header", "user_from_body",
         "hash_users", "user_hash_salt", "tags_header")
    )  # fmt: skip
    default_agent = attribution.string("default_agent", "anonymous")
    try:
        validate_id(default_agent, "agent")
    except IdError as e:
        attribution.fail("default_agent", e.reason)
    return {
        "agent_header": attribution.string("agent_header", "X-Agent-Id"),
        "intent_header": attribution.string("intent_header", "X-Intent-Id"),
        "default_agent": default_agent,
        "user_header": attribution.string("user_header", "X-Meter-User"),
        "user_from_body": attribution.boolean("user_from_body", True),
        "hash_users": attribution.boolean("hash_users", False),
        "user_hash_salt": attribution.string("user_hash_salt", None, env=True),
        "tags_header": attribution.string("tags_header", "X-Meter-Tags"),
    }


def _admin(top: Section) -> dict[str, Any]:
    admin = top.section("admin")
    admin.check_unknown(("token", "protect_metrics"))
    token = admin.string("token", None, env=True)
    if token is not None and len(token) < 16:
        admin.fail("token", "must be at least 16 characters (meterproxy init generates one)")
    return {"admin_token": token, "metrics_need_token": admin.boolean("protect_metrics", False)}


def _logging(top: Section, base: Path) -> dict[str, Any]:
    logging_ = top.section("logging")
    logging_.check_unknown(("format", "file", "level"))
    log_file = logging_.string("file", None)
    return {
        "log_format": logging_.choice("format", ("text", "json"), "text"),
        "log_file": (base / log_file) if log_file else None,
        "log_level": logging_.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
    }


def _budgets(top: Section, user_key: Callable[[str], str]) -> dict[str, Any]:
    budgets = top.section("budgets")
    budgets.check_unknown(
        (
            "timezone",
            "reserve_output_tokens",
            "reserve_input_margin",
            "reserve_input_margins",
            "on_uncapped",
            "clamp_share",
            "unpriced",
            "unknown_chain",
            "background_max_seconds",
            "global",
            "defaults",
            "agents",
            "users",
            "user_defaults",
        )
    )
    tz = budgets.string("timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        budgets.report(
            budgets.error("timezone", tz, "is not a known time zone (e.g. UTC, Europe/Berlin)")
        )
        tz = "UTC"
    margins = budgets.section("reserve_input_margins")
    margins.check_unknown(PROVIDERS)
    return {
        "timezone": tz,
        "reserve_output_tokens": budgets.integer(
            "reserve_output_tokens", 1024, min=1, max=MAX_TOKENS
        ),
        "reserve_input_margin": budgets.number("reserve_input_margin", 0.1, min=0, max=10),
        "reserve_input_margins": tuple(
            (p, float(margins.number(p, min=0, max=10))) for p in margins.data
        ),
        "on_uncapped": budgets.choice("on_uncapped", ("clamp", "expected", "reserve_max"), "clamp"),
        "clamp_share": budgets.number("clamp_share", 0.25, min=0.01, max=1),
        "unpriced": budgets.choice("unpriced", ("block", "allow"), "block"),
        "unknown_chain": budgets.choice(
            "unknown_chain", ("context_window", "block"), "context_window"
        ),
        "background_max_seconds": budgets.number(
            "background_max_seconds", 86400.0, min=1, max=30 * 86400
        ),
        "policies": parse_policies(budgets, user_key),
    }


def _user_key(top: Section) -> Callable[[str], str]:
    """How a user id written under budgets.users is stored (as calls store it)."""
    attribution = top.section("attribution")
    if attribution.data.get("hash_users") is not True:
        return str
    salt = attribution.string("user_hash_salt", None, env=True)
    return lambda user: user_digest(user, salt)


def _alerts(top: Section) -> dict[str, Any]:
    alerts = top.section("alerts")
    alerts.check_unknown(
        (
            "webhooks",
            "thresholds",
            "queue_size",
            "repeat_seconds",
            "upstream_failures",
            "runway_seconds",
        )
    )
    webhooks = []
    for i, item in enumerate(alerts.sequence("webhooks")):
        w = alerts.item("webhooks", i, item)
        w.check_unknown(("url", "format"))
        url = w.string("url", env=True)
        if not re.match(r"^https?://", url):
            w.report(w.error("url", url, "must be an http:// or https:// URL"))
            continue
        webhooks.append((url, w.choice("format", ("slack", "json"), "json")))
    thresholds = alerts.data.get("thresholds", [0.5, 0.8, 1.0])
    if not isinstance(thresholds, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in thresholds
    ):
        alerts.fail("thresholds", "must be a list of fractions in (0, 1], e.g. [0.5, 0.8, 1.0]")
    return {
        "alerts": AlertsConfig(
            webhooks=tuple(webhooks),
            thresholds=tuple(float(t) for t in thresholds),
            queue_size=alerts.integer("queue_size", 1000, min=1),
            repeat_seconds=alerts.number("repeat_seconds", 300.0, min=0),
            upstream_failures=alerts.integer("upstream_failures", 5, min=1),
            runway_seconds=alerts.number("runway_seconds", 3600.0, min=0, max=31 * 86400),
        )
    }


def _heartbeat(top: Section) -> dict[str, Any]:
    heartbeat = top.section("heartbeat")
    heartbeat.check_unknown(("enabled", "max_cost_usd"))
    enabled = heartbeat.data.get("enabled", "auto")
    if isinstance(enabled, bool):
        enabled = "true" if enabled else "false"
    if enabled not in ("auto", "true", "false"):
        heartbeat.fail("enabled", "must be auto, true or false")
    cap = heartbeat.usd("max_cost_usd", Decimal(100), max=MAX_HEARTBEAT_USD)
    return {"heartbeat_enabled": enabled, "heartbeat_max_cost_pico": usd_to_pico(cap)}


def _telemetry(top: Section) -> dict[str, Any]:
    """telemetry: the file's keys, else the OpenTelemetry SDK's own environment variables
    (OTEL_EXPORTER_OTLP_ENDPOINT, _PROTOCOL, _HEADERS, OTEL_SERVICE_NAME). On when an
    endpoint is known, unless `enabled: false`."""
    t = top.section("telemetry")
    t.check_unknown(("enabled", "endpoint", "protocol", "service_name", "headers",
                     "metrics_interval_seconds"))  # fmt: skip
    env = os.environ
    endpoint = t.string("endpoint", env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None, env=True)
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        t.report(t.error("endpoint", endpoint, "must be an http:// or https:// URL, e.g."
                         " http://127.0.0.1:4318"))  # fmt: skip
        endpoint = None
    protocol = env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    protocol = t.string("protocol", protocol)
    if protocol != "http/protobuf":
        t.report(t.error("protocol", protocol, "only http/protobuf is supported (OTLP over"
                         " HTTP, port 4318); gRPC would need grpcio"))  # fmt: skip
    headers: dict[str, str] = {}
    for part in env.get("OTEL_EXPORTER_OTLP_HEADERS", "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            headers[name.strip()] = value.strip()
    table = t.section("headers")
    for name in table.data:
        headers[str(name)] = table.string(str(name), env=True)
    enabled = t.boolean("enabled", endpoint is not None)
    if enabled and endpoint is None:
        t.fail("enabled", "is true but no endpoint is set (telemetry.endpoint or"
               " OTEL_EXPORTER_OTLP_ENDPOINT)")  # fmt: skip
    return {"telemetry": TelemetryConfig(
        enabled=bool(enabled), endpoint=endpoint, protocol=protocol,
        service_name=t.string("service_name", env.get("OTEL_SERVICE_NAME", "meterproxy")),
        headers=tuple(sorted(headers.items())),
        metrics_interval_seconds=t.number("metrics_interval_seconds", 60.0, min=1, max=3600),
    )}  # fmt: skip


def _guarded(top: Section, part: Callable[[], Any]) -> Any:
    """A part of the file read on its own: with a sink, its first error that no getter
    could absorb is kept and the part left at its defaults."""
    try:
        return part()
    except FieldError as e:
        return top.report(e)


def parse_config(
    data: Any,
    path: Path | None = None,
    *,
    sink: list[FieldError] | None = None,
    cwd: Path | None = None,
) -> Config:
    """A Config from the YAML's data. Without a sink the first bad value raises
    FieldError; with one, every bad value found is added to it (and defaults stand in)."""
    top = Section(data, sink=sink)
    top.check_unknown(TOP_KEYS)
    base = Path(path).resolve().parent if path else (cwd or Path.cwd()).resolve()
    parsed: dict[str, Any] = {}
    for part in (
        lambda: _server(top),
        lambda: _upstreams(top),
        lambda: _timeouts(top),
        lambda: _pricing(top, base),
        lambda: _storage(top, base),
        lambda: _attribution(top),
        lambda: _keys(top),
        lambda: _admin(top),
        lambda: _logging(top, base),
        lambda: _budgets(top, _user_key(top)),
        lambda: _alerts(top),
        lambda: _heartbeat(top),
        lambda: _telemetry(top),
    ):
        parsed |= _guarded(top, part) or {}
    _guarded(top, lambda: _keys_need_upstream_keys(top, parsed))
    return Config(path=Path(path).resolve() if path else None, **parsed)


def _read(path: Path) -> tuple[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def _line(path: Path, text: str, error: FieldError) -> str:
    line = yaml_line(text, error.parts)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {error.describe()}"


def load_config(
    path: Path | str | None, *, every_error: bool = False, found_by: str | None = None
) -> Config:
    """Read and validate a config file (None: all defaults). Raises ConfigError: with
    `every_error`, naming every bad value in the file, else the first."""
    if path is None:
        return parse_config({})
    path = Path(path)
    text, data = _read(path)
    if every_error:
        sink: list[FieldError] = []
        config = parse_config(data, path, sink=sink)
        if sink:
            error = ConfigError(*(_line(path, text, e) for e in sink))
            error.partial = replace(config, found_by=found_by)  # defaults where values were bad
            raise error
    else:
        try:
            config = parse_config(data, path)
        except FieldError as e:
            raise ConfigError(_line(path, text, e)) from None
    return replace(config, found_by=found_by)
