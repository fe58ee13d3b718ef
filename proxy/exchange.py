"""The call's exchange with the upstream: the request, and for a metered call that does
not stream, its whole answer; and what happens to it when the client leaves first.

A metered call that does not stream is let finish when its client hangs up: the
provider bills it anyway, so its answer is recorded. Its answer keeps arriving into its
Response (the connection's callbacks take it in, whatever becomes of the call's task),
and `detach` finishes it in a task started then, so no call pays for a task of its own.
A stream, and an unmetered call, are cut with their client.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy import relay
from proxy.call_cost import settle_unanswered
from proxy.call_end import commit, record_abnormal
from proxy.errors import ProxyFault
from proxy.faults import Stage
from proxy.http1 import Response
from proxy.upstream import client_timeout

if TYPE_CHECKING:
    from proxy.call import Call

Exchange = tuple[Response, bytes | None]


async def run(call: Call, url: str, headers: Any, data: Any) -> Exchange:
    """The request, and for a metered call that does not stream, its whole answer."""
    rec, config = call.record, call.svc.config
    try:
        response = await call.svc.upstreams.send(
            call.request.method, url, headers, data, client_timeout(config.timeouts, rec.stream)
        )
    except Exception as e:
        fault = call.upstream_fault(e, Stage.CONNECT)
        if fault is None:
            raise
        raise fault from None
    if call.metered and not rec.stream:
        call.awaited = response  # the request went out: finished even if the client leaves
    try:
        exchange = await answer(call, response)
    except asyncio.CancelledError:
        if call.awaited is None:  # cut with its client
            response.release()
        raise
    except BaseException:
        call.awaited = None
        response.release()
        raise
    call.awaited = None
    return exchange


async def answer(call: Call, response: Response) -> Exchange:
    """The answer's head, and for a metered call that does not stream, its body."""
    try:
        await response.head()
    except Exception as e:
        fault = call.upstream_fault(e, Stage.CONNECT)
        if fault is None:
            raise
        raise fault from None
    call.timings.head = time.perf_counter()
    if not call.metered or "text/event-stream" in response.headers.get("Content-Type", ""):
        return response, None
    try:
        body = await response.read()
    except Exception as e:
        fault = call.upstream_fault(e)
        if fault is None:
            raise
        raise fault from None
    call.timings.done = time.perf_counter()
    return response, body


def detach(call: Call) -> bool:
    """The client left while a metered call that does not stream waited for the upstream:
    let it finish there (bounded by timeouts.read) and record the provider's usage."""
    response, call.awaited = call.awaited, None
    if response is None:
        return False
    if call.svc.shutting_down:
        response.release()
        return False
    call.client_gone = True
    finishing = asyncio.ensure_future(_finish_detached(call, response))
    call.svc.inflight.add(finishing)  # a shutdown waits for it, then cancels it
    finishing.add_done_callback(call.svc.inflight.discard)
    return True


async def _finish_detached(call: Call, response: Response) -> None:
    rec = call.record
    try:
        try:
            _, body = await answer(call, response)
            if body is None:  # it streams: streams are cut with their client
                rec.error = "cancelled: the client disconnected"
                record_abnormal(call)
                return
            await relay.meter_json(call, response, body)
            rec.status = 499
            rec.error = (rec.error + "; " if rec.error else "") + (
                "client disconnected; the upstream's answer was recorded")  # fmt: skip
            await commit(call)
        finally:
            response.release()
    except ProxyFault as fault:
        rec.status, rec.error = 499, f"client disconnected; then {fault.code}: {fault.message}"
        await settle_unanswered(call)
        await commit(call)
    finally:
        if not call.recorded:
            record_abnormal(call)
