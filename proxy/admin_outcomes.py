"""Outcomes over the admin API: close an intent with its outcome, and cost per outcome."""

from __future__ import annotations

from aiohttp import web

from proxy.admin_base import (
    admin,
    json_response,
    query_fault,
    query_times,
    read_json,
    report_response,
)
from proxy.errors import ProxyFault
from proxy.ids import IdError, validate_id
from proxy.outcomes import OUTCOMES, outcome_report, parse_outcome
from proxy.reports import ReportError
from proxy.services import Services


def _id(value: object, what: str, param: str) -> str:
    if not isinstance(value, str):
        raise ProxyFault(400, f"invalid_{what}_id", f"meterproxy: {param} must be a string",
                         param=param)  # fmt: skip
    try:
        return validate_id(value, what)
    except IdError as e:
        raise ProxyFault(400, f"invalid_{what}_id", f"meterproxy: {param}: {e.reason}",
                         param=param) from None  # fmt: skip


async def _owner(svc: Services, intent: str) -> str:
    """The agent whose intent this is, when only one agent used the id."""
    await svc.storage.sync_rollups()
    rows = await svc.storage.intents_named(intent)
    if not rows:
        raise ProxyFault(404, "unknown_intent", f"meterproxy: no calls recorded for intent"
                         f" '{intent}'; name its agent to close it anyway")  # fmt: skip
    if len(rows) > 1:
        names = ", ".join(f"'{r.agent}'" for r in rows)
        raise ProxyFault(409, "ambiguous_intent", f"meterproxy: agents {names} each have an"
                         f" intent '{intent}'; say which with 'agent'")  # fmt: skip
    return rows[0].agent


@admin
async def post_outcome(request: web.Request, svc: Services) -> web.StreamResponse:
    intent = _id(request.match_info["intent"], "intent", "path")
    data = await read_json(request)
    if not isinstance(data, dict):
        raise ProxyFault(400, "invalid_outcome", "meterproxy: send {'outcome': ...}")
    outcome = parse_outcome(data.get("outcome"))
    if outcome is None:
        raise ProxyFault(400, "invalid_outcome", "meterproxy: outcome must be one of"
                         f" {', '.join(OUTCOMES)}", param="outcome")  # fmt: skip
    named = request.match_info.get("agent") or data.get("agent")
    agent = _id(named, "agent", "agent") if named is not None else await _owner(svc, intent)
    now = svc.clock()
    await svc.close_intent(agent, intent, outcome, "api", now)
    return json_response({"agent": agent, "intent": intent, "outcome": outcome,
                          "at": svc.enforcer.calendar.iso(now)})  # fmt: skip


@admin
async def get_outcomes(request: web.Request, svc: Services) -> web.StreamResponse:
    q = request.query
    try:
        since, until = query_times(request, svc)
        report = await outcome_report(svc.storage, q.get("by", "agent"), since, until,
                                      q.get("agent") or None)  # fmt: skip
    except ReportError as e:
        raise query_fault(e) from None
    return report_response(request, report)


def outcome_routes() -> list[web.RouteDef]:
    return [
        web.post("/meter/intents/{intent}/outcome", post_outcome),
        web.post("/meter/agents/{agent}/intents/{intent}/outcome", post_outcome),
        web.get("/meter/outcomes", get_outcomes),
    ]
