"""`meterproxy agents | pause | resume`: through the running proxy's admin API."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import urllib.error
import urllib.request
from typing import Any

from proxy.config import Config, ConfigError


def admin_call(
    config: Config, args: argparse.Namespace, method: str, path: str, body: Any = None
) -> Any:
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
            detail = json.loads(detail)["error"]["message"].removeprefix("meterproxy: ")
        raise ConfigError(f"{method} {path}: HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise ConfigError(f"cannot reach the proxy at {base}: {e.reason}") from None


def agent_line(status: dict[str, Any]) -> str:
    day = status["windows"]["day"]
    limits = ", ".join(
        f"{lim['limit']}={lim.get('limit_usd', lim.get('max'))}"
        f" (left {lim.get('remaining_usd', lim.get('remaining'))})"
        for lim in status["limits"]
    )
    return (
        f"{status['agent']:<30} {status['state']:<7} today ${day['spent_usd']}"
        f" (+${day['reserved_usd']} reserved)  {limits or 'no limits'}"
    )


def agents(config: Config, args: argparse.Namespace) -> list[str]:
    return [agent_line(s) for s in admin_call(config, args, "GET", "/meter/agents")["agents"]]


def pause(config: Config, args: argparse.Namespace) -> str:
    body = {"reason": args.reason, "force": args.force}
    return agent_line(admin_call(config, args, "POST", f"/meter/agents/{args.agent}/pause", body))


def resume(config: Config, args: argparse.Namespace) -> str:
    return agent_line(admin_call(config, args, "POST", f"/meter/agents/{args.agent}/resume", {}))
