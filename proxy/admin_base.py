"""What every admin endpoint shares: the bearer token, JSON in and out, an agent id from
the path."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.errors import UNAVAILABLE_ERROR, ProxyFault
from proxy.ids import IdError, validate_id
from proxy.reports import ReportError, parse_time
from proxy.services import SERVICES, Services
from proxy.storage.base import StorageUnavailable

log = logging.getLogger("meterproxy.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def query_times(request: web.Request, svc: Services) -> tuple[float | None, float | None]:
    """`since` and `until` of a report's query (ReportError names a bad one)."""
    q, cal, now = request.query, svc.enforcer.calendar, svc.clock()
    since = parse_time(q["since"], cal, now, "since") if q.get("since") else None
    until = parse_time(q["until"], cal, now, "until") if q.get("until") else None
    return since, until


def query_fault(error: ReportError) -> ProxyFault:
    return ProxyFault(400, "invalid_query", f"meterproxy: {error}", param=error.param)


def report_response(request: web.Request, report: Any) -> web.Response:
    """A report as the query's `format` asks: json (the default) or csv."""
    fmt = request.query.get("format", "json")
    if fmt == "csv":
        return web.Response(text=report.to_csv(), content_type="text/csv")
    if fmt != "json":
        raise ProxyFault(
            400, "invalid_query", "meterproxy: format must be json or csv", param="format"
        )
    return json_response(report.to_json())


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def authorize(request: web.Request) -> Services:
    svc = request.app[SERVICES]
    token = svc.config.admin_token
    if token is None:
        raise ProxyFault(
            403,
            "admin_disabled",
            "meterproxy: the admin API is off; set admin.token in the config file to turn it on",
        )
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
        log.warning(
            "admin: refused %s %s from %s (%s)",
            request.method,
            request.path,
            request.remote,
            "no bearer token" if not presented else "wrong token",
        )
        raise ProxyFault(
            401,
            "invalid_admin_token",
            "meterproxy: this endpoint needs 'Authorization: Bearer <admin token>'",
        )
    return svc


def admin(handler: Callable[[web.Request, Services], Awaitable[web.StreamResponse]]) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request, authorize(request))
        except ProxyFault as fault:
            return fault.response()
        except StorageUnavailable as e:
            return ProxyFault(
                503,
                UNAVAILABLE_ERROR,
                f"meterproxy: the database cannot be reached ({e}); try again when it is back",
                type_=UNAVAILABLE_ERROR,
                headers={"Retry-After": "5"},
            ).response()

    return wrapped


def agent_of(request: web.Request) -> str:
    agent = request.match_info["agent"]
    try:
        return validate_id(agent, "agent")
    except IdError as e:
        raise ProxyFault(400, "invalid_agent_id", f"meterproxy: {e.reason}") from None


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProxyFault(
            400, "invalid_json", f"meterproxy: the body is not valid JSON ({e})"
        ) from None
