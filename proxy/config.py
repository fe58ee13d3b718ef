"""The configuration file: parsed once into frozen dataclasses, validated with errors that
name the file, the key and the bad value. Nothing here prints or exits (see `cli`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from proxy.bounds import MAX_HEARTBEAT_USD, MAX_TOKENS
from proxy.hosts import is_loopback_host
from proxy.ids import IdError, validate_id
from proxy.money import usd_to_pico
from proxy.policy import PolicySet, parse_policies
from proxy.pricing import bundled_pricing_path
from proxy.schema import MISSING, FieldError, Section, yaml_line

DEFAULT_UPSTREAM = "https://api.openai.com/v1"
PROVIDERS = ("openai", "anthropic", "azure", "gemini")
# Providers whose tokenizers count more than tiktoken on ordinary text (README, Providers).
DEFAULT_MARGINS = {"anthropic": 0.5, "gemini": 0.25}
# Where a provider's calls go when no upstream of that provider is configured (and no
# proxy keys are: then every upstream must carry its own key). Azure has no default: its
# endpoint is per resource.
IMPLICIT_UPSTREAMS = {
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
TOP_KEYS = (
    "server",
    "upstreams",
    "timeouts",
    "pricing",
    "storage",
    "attribution",
    "keys",
    "admin",
    "logging",
    "budgets",
    "alerts",
    "heartbeat",
)


class ConfigError(Exception):
    """A config file that cannot be used; `str()` is one line: file, key, value, reason."""


def _glob_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api_key: str | None = None
    models: tuple[str, ...] = ()
    default: bool = False
    # Ask streams for a usage chunk (stream_options.include_usage) when the client did not.
    inject_usage: bool = True
    provider: str = "openai"  # the API it speaks: openai | anthropic | azure | gemini
    deployments: tuple[tuple[str, str], ...] = ()  # Azure: deployment -> model it serves
    # The tier a call is billed at when it asks for none (or for `auto`): OpenAI projects
    # can be set to default to priority processing.
    default_service_tier: str | None = None
    _pattern: re.Pattern[str] | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Globs compiled once into one regex: routing costs one match per upstream.
        object.__setattr__(self, "_pattern", _glob_regex(self.models))

    def matches(self, model: str) -> bool:
        return self._pattern is not None and self._pattern.match(model) is not None

    def deployment_model(self, deployment: str) -> str | None:
        return dict(self.deployments).get(deployment)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    read: float = 600.0  # a non-streaming reasoning call can take minutes
    stream_idle: float = 300.0  # longest silence between two chunks of a stream


@dataclass(frozen=True)
class AlertsConfig:
    webhooks: tuple[tuple[str, str], ...] = ()  # (url, format)
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    queue_size: int = 1000
    repeat_seconds: float = 300.0  # a repeating refusal alerts at most once per interval
    upstream_failures: int = 5  # consecutive failed calls that make an upstream "failing"


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8787
    max_body_bytes: int = 32 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    # A connection that has not sent a whole request head in this long is closed (slow
    # loris), as is an idle keep-alive connection.
    keepalive_timeout: float = 75.0
    event_loop: str = "auto"  # auto: uvloop when installed, else asyncio's
    body_timeout: float = 60.0  # a metered request body must arrive within this (408)
    # Web pages (origins) that may call the proxy; none by default (see proxy.security).
    allowed_origins: tuple[str, ...] = ()
    # Host names the proxy answers to; None: loopback names and IP literals (any name when
    # bound elsewhere than loopback with proxy keys).
    allowed_hosts: tuple[str, ...] | None = None
    upstreams: tuple[Upstream, ...] = (Upstream("openai", DEFAULT_UPSTREAM, default=True),)
    timeouts: Timeouts = Timeouts()
    pricing_path: Path = field(default_factory=bundled_pricing_path)
    unknown_model: str = "allow"
    reload_interval_seconds: float = 1.0
    db_url: str = "sqlite:///meterproxy.db"
    sqlite_synchronous: str = "NORMAL"
    retention_days: int | None = None
    on_storage_error: str = "closed"
    # Ledger rows that could not reach PostgreSQL wait here until it is back.
    spool_dir: Path = Path("meterproxy-spool")
    # PostgreSQL connections per process: replicas x workers x this must stay under the
    # server's max_connections (100 by default).
    pool_size: int = 10
    # A call's answer waits at most this long for its ledger row (then goes out anyway).
    commit_timeout: float = 5.0
    # Rows waiting this long without a commit make /meter/health say degraded.
    stall_seconds: float = 10.0
    agent_header: str = "X-Agent-Id"
    intent_header: str = "X-Intent-Id"
    default_agent: str = "anonymous"
    keys: dict[str, str] = field(default_factory=dict)  # proxy key -> agent
    admin_token: str | None = None
    metrics_need_token: bool = False  # /metrics behind the admin token too
    log_format: str = "text"
    log_file: Path | None = None
    log_level: str = "INFO"
    timezone: str = "UTC"
    # The least output an uncapped call is expected to produce (a stream's first slice);
    # more when the agent's own recent answers from that model run longer.
    reserve_output_tokens: int = 1024
    # Input tokens reserved = tiktoken's count x (1 + margin): providers count a little
    # differently, and the guarantee needs the reservation to be an upper bound.
    reserve_input_margin: float = 0.1
    # Per provider, where its tokenizer counts more than tiktoken (see README, Providers).
    reserve_input_margins: tuple[tuple[str, float], ...] = ()
    # A non-streamed call whose output cap the remaining budget cannot cover: clamp its cap
    # to what the budget affords (default), reserve on its expected size (expected), or
    # refuse it (reserve_max).
    on_uncapped: str = "clamp"
    clamp_share: float = 0.25  # the most of what remains one uncapped call may reserve
    unpriced: str = "block"  # what cannot be priced, for agents under a block limit
    unknown_chain: str = "context_window"  # a chain the proxy did not see: or block
    background_max_seconds: float = 86400.0  # how long a background response is awaited
    policies: PolicySet = field(default_factory=PolicySet)
    alerts: AlertsConfig = AlertsConfig()
    heartbeat_enabled: str = "auto"  # auto: on when bound to loopback or with proxy keys
    heartbeat_max_cost_pico: int = 100 * 10**12  # what one heartbeat may report

    @property
    def heartbeats_on(self) -> bool:
        if self.heartbeat_enabled != "auto":
            return self.heartbeat_enabled == "true"
        return is_loopback_host(self.host) or bool(self.keys)

    @property
    def default_upstream(self) -> Upstream:
        for upstream in self.upstreams:
            if upstream.default:
                return upstream
        return self.upstreams[0]

    def upstream_for(self, model: str | None, provider: str = "openai") -> Upstream | None:
        """The first upstream of `provider` whose globs match the model, else that
        provider's default one (the configured default for OpenAI), else the implicit one
        (Anthropic, Gemini), else None."""
        candidates = [u for u in self.upstreams if u.provider == provider]
        if model is not None:
            for upstream in candidates:
                if upstream.matches(model):
                    return upstream
        if provider == "openai" and self.default_upstream.provider == "openai":
            return self.default_upstream
        for upstream in candidates:
            if upstream.default:
                return upstream
        if candidates:
            return candidates[0]
        if provider in IMPLICIT_UPSTREAMS and not self.keys:
            return Upstream(provider, IMPLICIT_UPSTREAMS[provider], provider=provider)
        return None

    def input_margin(self, provider: str) -> float:
        """tiktoken's count x (1 + this) bounds what the provider will count as input."""
        margins = dict(self.reserve_input_margins)
        if provider in margins:
            return margins[provider]
        return max(self.reserve_input_margin, DEFAULT_MARGINS.get(provider, 0.0))

    def with_overrides(self, **changes: Any) -> Config:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _upstreams(top: Section) -> tuple[Upstream, ...]:
    items = top.sequence("upstreams")
    if not items:
        return Config.upstreams
    upstreams = []
    names: set[str] = set()
    for i, item in enumerate(items):
        s = top.item("upstreams", i, item)
        s.check_unknown(("name", "base_url", "api_key", "models", "default", "inject_usage",
                         "provider", "deployments", "default_service_tier"))  # fmt: skip
        name = s.string("name")
        if name in names:
            s.fail("name", "is used by another upstream")
        names.add(name)
        base_url = s.string("base_url").rstrip("/")
        if not re.match(r"^https?://[^/\s]+", base_url):
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
        upstreams.append(
            Upstream(
                name=name,
                base_url=base_url,
                api_key=s.string("api_key", None, env=True),
                models=models,
                default=s.boolean("default", False),
                inject_usage=s.boolean("inject_usage", True),
                provider=provider,
                deployments=tuple(pairs),
                default_service_tier=_tier(
                    s.choice("default_service_tier", ("default", "priority", "flex"), "default")
                ),
            )
        )
    if sum(u.default for u in upstreams) > 1:
        raise FieldError("upstreams", "(several)", "only one upstream can be the default")
    return tuple(upstreams)


def _margins(section: Section) -> tuple[tuple[str, float], ...]:
    section.check_unknown(PROVIDERS)
    return tuple((p, float(section.number(p, min=0, max=10))) for p in section.data)


def _tier(value: str) -> str | None:
    return None if value == "default" else value


def _keys(top: Section) -> dict[str, str]:
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
    return out


def parse_config(data: Any, path: Path | None = None) -> Config:
    top = Section(data)
    top.check_unknown(TOP_KEYS)
    base = Path(path).parent if path else Path.cwd()

    server = top.section("server")
    server.check_unknown(
        ("host", "port", "max_body_bytes", "shutdown_grace_seconds", "keepalive_timeout",
         "body_timeout", "event_loop", "allowed_origins", "allowed_hosts")
    )  # fmt: skip
    timeouts = top.section("timeouts")
    timeouts.check_unknown(("connect", "read", "stream_idle"))
    pricing = top.section("pricing")
    pricing.check_unknown(("file", "unknown_model", "reload_interval_seconds"))
    storage = top.section("storage")
    storage_keys = ("url", "sqlite_synchronous", "retention_days", "on_storage_error")
    storage.check_unknown(
        (*storage_keys, "spool_dir", "pool_size", "commit_timeout_seconds", "stall_seconds")
    )
    heartbeat = top.section("heartbeat")
    heartbeat.check_unknown(("enabled", "max_cost_usd"))
    enabled = heartbeat.data.get("enabled", "auto")
    if isinstance(enabled, bool):
        enabled = "true" if enabled else "false"
    if enabled not in ("auto", "true", "false"):
        heartbeat.fail("enabled", "must be auto, true or false")
    origins = []
    for i, origin in enumerate(server.strings("allowed_origins")):
        o = origin.strip().lower().rstrip("/")
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
            raise FieldError(
                f"server.allowed_origins[{i}]",
                origin,
                "must be an origin like https://app.example.com (scheme, host, optional port;"
                " no path) or *",
                ("server", "allowed_origins", i),
            )
        origins.append(o)
    hosts = server.strings("allowed_hosts") if server.has("allowed_hosts") else None
    attribution = top.section("attribution")
    attribution.check_unknown(("agent_header", "intent_header", "default_agent"))
    admin = top.section("admin")
    admin.check_unknown(("token", "protect_metrics"))
    logging_ = top.section("logging")
    logging_.check_unknown(("format", "file", "level"))
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
        )
    )
    alerts = top.section("alerts")
    alerts.check_unknown(
        ("webhooks", "thresholds", "queue_size", "repeat_seconds", "upstream_failures")
    )

    tz = budgets.string("timezone", "UTC")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        budgets.fail("timezone", "is not a known time zone (e.g. UTC, Europe/Berlin)")

    pricing_file = pricing.string("file", None)
    log_file = logging_.string("file", None)
    spool_dir = storage.string("spool_dir", None)
    db_url = storage.string("url", Config.db_url, env=True)
    token = admin.string("token", None, env=True)
    if token is not None and len(token) < 16:
        admin.fail("token", "must be at least 16 characters")

    default_agent = attribution.string("default_agent", "anonymous")
    try:
        validate_id(default_agent, "agent")
    except IdError as e:
        attribution.fail("default_agent", e.reason)

    webhooks = []
    for i, item in enumerate(alerts.sequence("webhooks")):
        w = alerts.item("webhooks", i, item)
        w.check_unknown(("url", "format"))
        url = w.string("url", env=True)
        if not re.match(r"^https?://", url):
            w.fail("url", "must be an http:// or https:// URL")
        webhooks.append((url, w.choice("format", ("slack", "json"), "json")))
    thresholds = alerts.data.get("thresholds", [0.5, 0.8, 1.0])
    if not isinstance(thresholds, list) or not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in thresholds
    ):
        alerts.fail("thresholds", "must be a list of fractions in (0, 1], e.g. [0.5, 0.8, 1.0]")

    keys = _keys(top)
    upstreams = _upstreams(top)
    if keys:
        for i, upstream in enumerate(upstreams):
            if upstream.api_key is None and top.sequence("upstreams"):
                raise FieldError(
                    f"upstreams[{i}].api_key",
                    MISSING,
                    "is required when proxy keys are configured (the client's key is a proxy"
                    " key and must not reach the provider)",
                    ("upstreams", i, "api_key"),
                )
        if not top.sequence("upstreams"):
            raise FieldError("upstreams", None, "proxy keys need upstreams with an api_key each")

    return Config(
        path=path,
        host=server.string("host", "127.0.0.1"),
        port=server.integer("port", 8787, min=0, max=65535),
        max_body_bytes=server.integer("max_body_bytes", Config.max_body_bytes, min=1024),
        shutdown_grace_seconds=server.number("shutdown_grace_seconds", 30.0, min=0),
        keepalive_timeout=server.number("keepalive_timeout", 75.0, min=0.01),
        body_timeout=server.number("body_timeout", 60.0, min=0.01),
        event_loop=server.choice("event_loop", ("auto", "uvloop", "asyncio"), "auto"),
        allowed_origins=tuple(origins),
        allowed_hosts=tuple(h.strip().lower() for h in hosts) if hosts is not None else None,
        upstreams=upstreams,
        timeouts=Timeouts(
            connect=timeouts.number("connect", 10.0, min=0.001),
            read=timeouts.number("read", 600.0, min=0.001),
            stream_idle=timeouts.number("stream_idle", 300.0, min=0.001),
        ),
        pricing_path=(base / pricing_file) if pricing_file else bundled_pricing_path(),
        unknown_model=pricing.choice("unknown_model", ("allow", "block"), "allow"),
        reload_interval_seconds=pricing.number("reload_interval_seconds", 1.0, min=0.01),
        db_url=db_url,
        sqlite_synchronous=storage.choice("sqlite_synchronous", ("NORMAL", "FULL"), "NORMAL"),
        retention_days=storage.integer("retention_days", None, min=1),
        on_storage_error=storage.choice("on_storage_error", ("closed", "open"), "closed"),
        agent_header=attribution.string("agent_header", "X-Agent-Id"),
        intent_header=attribution.string("intent_header", "X-Intent-Id"),
        default_agent=default_agent,
        keys=keys,
        admin_token=token,
        metrics_need_token=admin.boolean("protect_metrics", False),
        log_format=logging_.choice("format", ("text", "json"), "text"),
        log_file=(base / log_file) if log_file else None,
        spool_dir=(base / spool_dir) if spool_dir else Config.spool_dir,
        pool_size=storage.integer("pool_size", 10, min=1, max=1000),
        commit_timeout=storage.number("commit_timeout_seconds", 5.0, min=0.01, max=3600),
        stall_seconds=storage.number("stall_seconds", 10.0, min=0.1, max=86400),
        log_level=logging_.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        timezone=tz,
        reserve_output_tokens=budgets.integer("reserve_output_tokens", 1024, min=1, max=MAX_TOKENS),
        reserve_input_margin=budgets.number("reserve_input_margin", 0.1, min=0, max=10),
        reserve_input_margins=_margins(budgets.section("reserve_input_margins")),
        on_uncapped=budgets.choice("on_uncapped", ("clamp", "expected", "reserve_max"), "clamp"),
        clamp_share=budgets.number("clamp_share", 0.25, min=0.01, max=1),
        unpriced=budgets.choice("unpriced", ("block", "allow"), "block"),
        unknown_chain=budgets.choice(
            "unknown_chain", ("context_window", "block"), "context_window"
        ),
        background_max_seconds=budgets.number(
            "background_max_seconds", 86400.0, min=1, max=30 * 86400
        ),
        policies=parse_policies(budgets),
        alerts=AlertsConfig(
            webhooks=tuple(webhooks),
            thresholds=tuple(float(t) for t in thresholds),
            queue_size=alerts.integer("queue_size", 1000, min=1),
            repeat_seconds=alerts.number("repeat_seconds", 300.0, min=0),
            upstream_failures=alerts.integer("upstream_failures", 5, min=1),
        ),
        heartbeat_enabled=enabled,
        heartbeat_max_cost_pico=usd_to_pico(
            heartbeat.usd("max_cost_usd", Decimal(100), max=MAX_HEARTBEAT_USD)
        ),
    )


def load_config(path: Path | str | None) -> Config:
    """Read and validate a config file (None: all defaults). Raises ConfigError."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    try:
        return parse_config(data, path)
    except FieldError as e:
        line = yaml_line(text, e.parts)
        where = f"{path}:{line}" if line else str(path)
        raise ConfigError(f"{where}: {e.describe()}") from None
