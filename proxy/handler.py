"""The aiohttp handlers of the API prefixes: each request becomes one `proxy.call.Call`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.call import Call
from proxy.services import SERVICES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def proxy_handler(prefix: str) -> Handler:
    """The handler of `/{prefix}/...` (and `/agents/{agent}/{prefix}/...`)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES]
        task = asyncio.current_task()
        assert task is not None
        svc.inflight.add(task)
        try:
            return await Call(svc, request, prefix).run()
        finally:
            svc.inflight.discard(task)

    return handle
