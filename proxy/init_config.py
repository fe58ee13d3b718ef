"""`meterproxy init`: a first config file, commented, for one upstream.

Pure text generation: the CLI writes the file. What it writes must pass `meterproxy check`
(a test reads it back through the same parser as `serve`).
"""

from __future__ import annotations

import secrets
from urllib.parse import urlsplit

PROVIDER_HOSTS = (
    ("anthropic.com", "anthropic"),
    ("googleapis.com", "gemini"),
    ("openai.azure.com", "azure"),
)
KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
}


def guess_provider(url: str) -> str:
    """The API an upstream speaks, from its host name (OpenAI's, for anything else:
    vLLM, Ollama, OpenRouter and most gateways speak it)."""
    host = (urlsplit(url).hostname or "").lower()
    for suffix, provider in PROVIDER_HOSTS:
        if host == suffix or host.endswith("." + suffix):
            return provider
    return "openai"


def new_admin_token() -> str:
    return "mp-admin-" + secrets.token_urlsafe(24)


def render_config(upstream: str, provider: str, token: str, port: int = 8787) -> str:
    upstream = upstream.rstrip("/")
    if provider != "openai":
        for suffix in ("/v1beta", "/v1"):  # these providers take the root URL
            upstream = upstream.removesuffix(suffix)
    env = KEY_ENV[provider]
    client_env = {
        "anthropic": f"ANTHROPIC_BASE_URL=http://127.0.0.1:{port}",
        "gemini": f"GOOGLE_GEMINI_BASE_URL=http://127.0.0.1:{port}",
    }.get(provider, f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1")
    return f"""\
# meterproxy configuration, written by `meterproxy init`.
# Point your agents at the proxy:  {client_env}
# and tag their calls:             X-Agent-Id: <agent>   X-Intent-Id: <task> (optional)
# Validate after an edit:          meterproxy check   (every error, with its line)
# Most keys reload while the proxy runs; the README's "Reload" table lists those that
# need a restart (the proxy logs a WARNING when one of them changes).
# Relative paths below are relative to this file, wherever you run meterproxy from.

server:
  host: 127.0.0.1        # 0.0.0.0 to serve other machines: then set proxy keys (README)
  port: {port}

upstreams:
  - name: main
    provider: {provider}
    base_url: {upstream}
    default: true
    # The proxy passes the client's own API key through. To keep the key here instead:
    # api_key: ${{{env}}}

storage:
  url: sqlite:///meterproxy.db   # the ledger, next to this file; or postgresql://...

admin:
  # For the dashboard (http://127.0.0.1:{port}/meter/) and `meterproxy agents|pause|resume`.
  # At least 16 characters; keep it secret.
  token: {token}

budgets:
  timezone: UTC
  # Every agent without its own policy: at most $20 a day, then 429 until midnight.
  defaults:
    max_cost_per_day_usd: 20
    action_on_breach: block        # block | alert | pause | shadow (dry run)
  # agents:
  #   research-agent:
  #     max_cost_per_day_usd: 5
  #     max_cost_per_intent_usd: 0.50
  #     loop_guard: {{max_identical_requests: 5, window_seconds: 60}}
  # Each of an agent's end users (the request's `user`, or X-Meter-User):
  # user_defaults:
  #   max_cost_per_day_usd: 1
  # global:
  #   max_cost_per_month_usd: 500

# alerts:
#   webhooks:
#     - url: https://hooks.slack.com/services/...
#       format: slack

logging:
  format: text           # or json
  # file: meterproxy.log # start-up lines, warnings and errors still reach the terminal
"""
