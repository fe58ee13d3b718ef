"""The admin API under /meter/: agents, policies, pauses, intents, spend, recent calls.

Every endpoint here needs `Authorization: Bearer <admin.token>`, compared in constant
time; without a token in the config the admin API is off and says so.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from proxy.admin_base import (
    admin,
    agent_of,
    json_response,
    query_fault,
    query_times,
    read_json,
    report_response,
)
from proxy.admin_outcomes import outcome_routes
from proxy.admission import intent_key
from proxy.budget_views import known_agents, status
from proxy.errors import ProxyFault
from proxy.heartbeat import heartbeat
from proxy.money import usd_exact
from proxy.policy import COST_WINDOWS, INTENT_COST_LIMIT, validate_policy_json
from proxy.reports import ReportError, spend_report
from proxy.schema import FieldError
from proxy.services import Services
from proxy.storage.base import IntentRow

log = logging.getLogger("meterproxy.admin")


@admin
async def list_agents(request: web.Request, svc: Services) -> web.StreamResponse:
    now = svc.clock()
    cal = svc.enforcer.calendar
    windows = {}
    for kind in COST_WINDOWS:
        start, end = cal.window(kind, now)
        windows[kind] = {"starts": cal.iso(start), "resets": cal.iso(end)}
    return json_response(
        {
            "timezone": cal.tz_name,
            "windows": windows,
            "reserved_usd": usd_exact(svc.enforcer.outstanding_pico),
            "agents": [status(svc.enforcer, a, now) for a in known_agents(svc.enforcer)],
        }
    )


@admin
async def get_agent(request: web.Request, svc: Services) -> web.StreamResponse:
    return json_response(status(svc.enforcer, agent_of(request), svc.clock()))


@admin
async def put_policy(request: web.Request, svc: Services) -> web.StreamResponse:
    agent = agent_of(request)
    data = await read_json(request)
    try:
        policy = validate_policy_json(data)
    except FieldError as e:
        raise ProxyFault(
            400, "invalid_policy", f"meterproxy: policy {e.describe()}", param=e.key
        ) from None
    now = svc.clock()
    await svc.storage.put_policy(agent, orjson.dumps(policy.source).decode(), now)
    enforcer = svc.enforcer
    enforcer.policies = enforcer.policies.with_api({**enforcer.policies.api, agent: policy})
    log.info("admin: policy of agent '%s' set through the API: %s", agent, policy.source)
    return json_response(status(enforcer, agent, now))


@admin
async def delete_policy(request: web.Request, svc: Services) -> web.StreamResponse:
    agent = agent_of(request)
    removed = await svc.storage.delete_policy(agent)
    api = dict(svc.enforcer.policies.api)
    removed = api.pop(agent, None) is not None or removed
    if not removed:
        raise ProxyFault(
            404, "no_api_policy", f"meterproxy: agent '{agent}' has no policy set through the API"
        )
    svc.enforcer.policies = svc.enforcer.policies.with_api(api)
    log.info("admin: API policy of agent '%s' removed; the config's applies again", agent)
    return json_response(status(svc.enforcer, agent, svc.clock()))


async def _known_or_refuse(svc: Services, agent: str) -> None:
    """A pause for an agent that never called and has no policy is most likely a typo:
    refused unless forced (an agent can be paused before its first call that way)."""
    known = known_agents(svc.enforcer)
    if agent in known or await svc.storage.agent_seen(agent):
        return
    names = sorted(set(known) | set(await svc.storage.all_agents()))
    close = difflib.get_close_matches(agent, names, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    raise ProxyFault(
        404, "unknown_agent",
        f"meterproxy: agent '{agent}' has never called and has no policy{hint} To pause it"
        " anyway (before its first call), send {\"force\": true} (meterproxy pause --force)",
    )  # fmt: skip


@admin
async def pause_agent(request: web.Request, svc: Services) -> web.StreamResponse:
    agent = agent_of(request)
    data = await read_json(request, optional=True)
    reason = data.get("reason") if isinstance(data, dict) else None
    if reason is not None and not isinstance(reason, str):
        raise ProxyFault(
            400, "invalid_reason", "meterproxy: 'reason' must be a string", param="reason"
        )
    force = data.get("force", False) if isinstance(data, dict) else False
    if not isinstance(force, bool):
        raise ProxyFault(400, "invalid_force", "meterproxy: 'force' must be true or false",
                         param="force")  # fmt: skip
    if not force:
        await _known_or_refuse(svc, agent)
    now = svc.clock()
    await svc.enforcer.pause(agent, reason or "paused through the admin API", now)
    log.warning("admin: agent '%s' paused (%s)", agent, reason or "no reason given")
    return json_response(status(svc.enforcer, agent, now))


@admin
async def resume_agent(request: web.Request, svc: Services) -> web.StreamResponse:
    agent = agent_of(request)
    now = svc.clock()
    was_paused = await svc.enforcer.resume(agent, now)
    log.warning("admin: agent '%s' resumed%s", agent, "" if was_paused else " (was not paused)")
    return json_response(status(svc.enforcer, agent, now))


@admin
async def get_intent(request: web.Request, svc: Services) -> web.StreamResponse:
    """An intent's lifetime spend and limits. Intents live in their agent's lane: when
    several agents used one id, say which with ?agent= (or /meter/agents/{a}/intents/{i})."""
    intent = request.match_info["intent"]
    agent = request.match_info.get("agent") or request.query.get("agent") or None
    await svc.storage.sync_rollups()
    rows = await svc.storage.intents_named(intent, agent)
    if not rows and agent is not None and svc.enforcer.store.holds(intent_key(agent, intent)):
        return json_response(_intent_view(svc, agent, intent, None))  # not committed yet
    if not rows:
        raise ProxyFault(
            404,
            "unknown_intent",
            f"meterproxy: no calls recorded for intent '{intent}'"
            + (f" of agent '{agent}'" if agent else ""),
        )
    if len(rows) > 1:
        names = ", ".join(f"'{r.agent}'" for r in rows)
        raise ProxyFault(
            409, "ambiguous_intent",
            f"meterproxy: agents {names} each have an intent '{intent}' (intents are per"
            f" agent); ask for one: /meter/agents/<agent>/intents/{intent}",
        )  # fmt: skip
    row = rows[0]
    return json_response(_intent_view(svc, row.agent, intent, row))


def _intent_view(svc: Services, agent: str, intent: str, row: IntentRow | None) -> dict[str, Any]:
    key = intent_key(agent, intent)
    in_view = svc.enforcer.store.holds(key)
    used, reserved = svc.enforcer.store.value(key)
    spent = used if in_view or row is None else row.cost_pico
    cal = svc.enforcer.calendar
    out: dict[str, Any] = {
        "intent": intent,
        "agent": agent,
        "spent_usd": usd_exact(spent),
        "reserved_usd": usd_exact(reserved if in_view else 0),
    }
    if row is not None:
        out |= {
            "first_seen": cal.iso(row.first_seen),
            "last_seen": cal.iso(row.last_seen),
            "requests": row.requests,
            "llm_calls": row.llm_calls,
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "unpriced": row.unpriced,
        }
    limits = []
    policy, _ = svc.enforcer.policies.for_agent(agent)
    for scope, p in (("agent", policy), ("global", svc.enforcer.policies.global_policy)):
        if p is not None and p.cost_per_intent is not None:
            limits.append(
                {
                    "scope": scope,
                    "limit": INTENT_COST_LIMIT,
                    "limit_usd": usd_exact(p.cost_per_intent),
                    "remaining_usd": usd_exact(max(p.cost_per_intent - spent - reserved, 0)),
                    "action": p.action,
                }
            )
    out["limits"] = limits
    return out


@admin
async def get_spend(request: web.Request, svc: Services) -> web.StreamResponse:
    q = request.query
    try:
        since, until = query_times(request, svc)
        report = await spend_report(
            svc.storage,
            svc.enforcer.calendar,
            by=q.get("by", "agent"),
            window=q.get("window") or None,
            since=since,
            until=until,
            agent=q.get("agent") or None,
        )
    except ReportError as e:
        raise query_fault(e) from None
    return report_response(request, report)


@admin
async def recent_calls(request: web.Request, svc: Services) -> web.StreamResponse:
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 1000)
    except ValueError:
        raise ProxyFault(
            400, "invalid_query", "meterproxy: limit must be a number", param="limit"
        ) from None
    rows = await svc.storage.recent_calls(limit, request.query.get("agent") or None)
    cal = svc.enforcer.calendar
    for row in rows:
        cost = row.pop("cost_pico")
        row["cost_usd"] = usd_exact(cost) if cost is not None else None
        row["reserved_usd"] = usd_exact(row.pop("reserved_pico"))
        row["started_at"] = cal.iso(row["started_at"])
        row["ended_at"] = cal.iso(row["ended_at"])
        row["stream"] = bool(row["stream"])
        row["refused"] = bool(row["refused"])
    return json_response({"calls": rows})


_STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page talks only to this proxy: no CDN, no inline script, no third-party anything.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _static(name: str) -> web.Response:
    path = _STATIC / name
    if name not in _STATIC_FILES:
        raise web.HTTPNotFound()
    return web.Response(
        body=_STATIC_FILES[name],
        content_type=_TYPES[path.suffix],
        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
    )


# Read once at import: three small files, served from memory.
_STATIC_FILES = {p.name: p.read_bytes() for p in _STATIC.iterdir() if p.suffix in _TYPES}


async def dashboard(request: web.Request) -> web.StreamResponse:
    """The page itself holds no data: it asks for the admin token and reads the API."""
    return _static("dashboard.html")


async def static_file(request: web.Request) -> web.StreamResponse:
    return _static(request.match_info["name"])


def admin_routes() -> list[web.RouteDef]:
    return [
        web.get("/meter/agents", list_agents),
        web.get("/meter/agents/{agent}", get_agent),
        web.put("/meter/agents/{agent}/policy", put_policy),
        web.delete("/meter/agents/{agent}/policy", delete_policy),
        web.post("/meter/agents/{agent}/pause", pause_agent),
        web.post("/meter/agents/{agent}/resume", resume_agent),
        web.get("/meter/intents/{intent}", get_intent),
        web.get("/meter/agents/{agent}/intents/{intent}", get_intent),
        web.get("/meter/spend", get_spend),
        *outcome_routes(),
        web.get("/meter/calls", recent_calls),
        web.post("/meter/heartbeat", heartbeat),
        web.get("/meter/dashboard", dashboard),
        web.get("/meter/static/{name}", static_file),
    ]
