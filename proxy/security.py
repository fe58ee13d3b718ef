"""Browser requests: a web page must not spend through the proxy, nor read it.

A proxy on 127.0.0.1 is reachable from every web page the user opens. Two attacks follow,
and two checks stop them before anything is forwarded:

- A page on another origin POSTs to the proxy (`fetch(..., {mode: "no-cors"})` needs no
  preflight). Browsers send `Origin` with every such request: one that is neither the
  proxy's own (the dashboard) nor in `server.allowed_origins` gets 403.
- DNS rebinding: a page points its own name at 127.0.0.1 and reads the answers as
  same-origin. Its requests carry that name in `Host`: a `Host` that is not one of the
  proxy's names (`server.allowed_hosts`) gets 421. IP literals are always allowed (a page
  cannot be served from the proxy's own address), and so is any name when the proxy is
  bound elsewhere than loopback with proxy keys (a key is then what guards it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.errors import ProxyFault
from proxy.hosts import host_allowed, host_name, origin_allowed
from proxy.services import SERVICES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CORS_METHODS = "GET, POST, PUT, DELETE, OPTIONS"


def _fault(status: int, code: str, message: str) -> web.Response:
    return ProxyFault(status, code, message).response()


def guard(handler: Handler) -> Handler:
    """`handler` behind both checks. Every route is registered guarded, instead of one
    middleware: an app with any middleware runs two extra coroutine layers per request
    (aiohttp adds one of its own), and most requests are agents' calls with no `Origin`,
    for which the checks are two header look-ups."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        config = request.app[SERVICES].config
        host_header = request.headers.get("Host", "")
        if host_header and not host_allowed(host_name(host_header), config.allowed_hosts,
                                            config.host, bool(config.keys)):  # fmt: skip
            return _fault(
                421, "host_not_allowed",
                f"meterproxy: requests for host '{host_name(host_header)}' are not served"
                " here; add it to server.allowed_hosts if this proxy is meant to answer to"
                " that name",
            )  # fmt: skip
        origin = request.headers.get("Origin")
        if origin is None:
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                return _fault(403, "origin_not_allowed",
                              "meterproxy: cross-site browser requests are refused")  # fmt: skip
            return await handler(request)
        return await _from_a_page(request, handler, origin, host_header, config.allowed_origins)

    return guarded


async def _from_a_page(
    request: web.Request, handler: Handler, origin: str, host_header: str,
    allowed: tuple[str, ...],
) -> web.StreamResponse:  # fmt: skip
    if not origin_allowed(origin, host_header, allowed):
        return _fault(
            403, "origin_not_allowed",
            f"meterproxy: requests from web pages on origin '{origin[:200]}' are refused;"
            " list the origin in server.allowed_origins to allow it",
        )  # fmt: skip
    cross = origin.strip().lower() in allowed or "*" in allowed
    if not cross:
        return await handler(request)
    if request.method == "OPTIONS":
        response: web.StreamResponse = web.Response(status=204)
        wanted = request.headers.get("Access-Control-Request-Headers")
        if wanted:
            response.headers["Access-Control-Allow-Headers"] = wanted
        response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
        response.headers["Access-Control-Max-Age"] = "600"
        _cors_headers(response, origin)
        return response
    request[CORS_ORIGIN] = origin  # a stream prepares its own response: see allow_reading
    try:
        response = await handler(request)
    except web.HTTPException as e:
        _cors_headers(e, origin)
        raise
    if not response.prepared:
        _cors_headers(response, origin)
    return response


async def no_route(request: web.Request) -> web.StreamResponse:
    """What a guarded catch-all answers when the guard let the request through."""
    raise web.HTTPNotFound()


CORS_ORIGIN = web.RequestKey("meterproxy.cors_origin", str)


def _cors_headers(response: web.StreamResponse, origin: str) -> None:
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = "x-meter-request-id, x-meter-cost-usd"
    response.headers["Vary"] = "Origin"


def allow_reading(request: web.Request, response: web.StreamResponse) -> None:
    """Before a handler prepares a response itself (a stream): an allowed cross-origin
    caller may read it."""
    origin = request.get(CORS_ORIGIN)
    if origin is not None:
        _cors_headers(response, origin)
