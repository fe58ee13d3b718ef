"""The configuration file: parsed once into frozen dataclasses, validated with errors that
name the file, the key and the bad value. Nothing here prints or exits (see `cli`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.hosts import is_loopback_host
from proxy.policy import PolicySet
from proxy.pricing import bundled_pricing_path

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
    "telemetry",
)


class ConfigError(Exception):
    """A config file that cannot be used; each line of `str()` names the file (and line),
    the key, the bad value and the reason. `check` reports every one it finds."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines
        self.partial: Config | None = None  # what could be read, defaults for the rest


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
    # A limit projected to run out (at the last 15 minutes' rate) sooner than this, and
    # before its window resets, raises a `budget_runway` event: once per limit and window.
    runway_seconds: float = 3600.0


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry export (`proxy.telemetry`): OTLP over HTTP, protobuf."""

    enabled: bool = False
    endpoint: str | None = None  # the collector's base URL: /v1/traces, /v1/metrics added
    protocol: str = "http/protobuf"
    service_name: str = "meterproxy"
    headers: tuple[tuple[str, str], ...] = ()
    metrics_interval_seconds: float = 60.0


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    found_by: str | None = None  # how the file was found: --config, $METERPROXY_CONFIG, ...
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
    # The agent's own customer: from this header, else (user_from_body) from the body's
    # `user` / `safety_identifier` (OpenAI) or `metadata.user_id` (Anthropic).
    user_header: str = "X-Meter-User"
    user_from_body: bool = True
    hash_users: bool = False  # store a digest of the end user, never the id itself
    user_hash_salt: str | None = None  # keys the digest (set it: emails can be guessed)
    tags_header: str = "X-Meter-Tags"  # free-form key=value tags: "team=search,env=prod"
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
    telemetry: TelemetryConfig = TelemetryConfig()

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
