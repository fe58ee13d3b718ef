"""The call's exchange with the upstream: the request, and for a metered call that does
not stream, its whole answer; and what happens to it when the client leaves first.

A non-streamed metered call runs its exchange in a task of its own and is let finish
when its client hangs up: the provider bills it anyway, so its answer is recorded. A
stream, and an unmetered call, run it in the call itself and are cut with their client.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy import relay
from proxy.errors import ProxyFault
from proxy.faults import Stage, classify
from proxy.http1 import Response
from proxy.upstream import client_timeout

if TYPE_CHECKING:
    from proxy.call import Call

Exchange = tuple[Response, bytes | None]


async def run(call: Call, url: str, headers: Any, data: Any) -> Exchange:
    if call.record.stream or not call.metered:
        # Cut with its client: a stream (the provider stops generating when the
        # connection drops) and what is not metered. No task needed.
        return await send(call, url, headers, data)
    # A task of its own: a client that leaves a non-streamed call does not stop it, and
    # the provider's answer (and bill) is still recorded.
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[Exchange] = loop.create_future()
    call.exchange_task = loop.create_task(handed(call, answer, url, headers, data))
    return await answer


async def handed(
    call: Call, answer: asyncio.Future[Exchange], url: str, headers: Any, data: Any
) -> Exchange | None:
    """`send`, its outcome handed to `answer`, which the call awaits instead of the
    task: cancelling the call cancels only `answer` (what `asyncio.shield` does, with
    one wake-up less). A call that was cancelled awaits the task itself (`detach`)."""
    try:
        exchange = await send(call, url, headers, data)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except BaseException as e:
        if answer.done():
            raise
        answer.set_exception(e)
        return None
    if answer.done():
        return exchange
    answer.set_result(exchange)
    return None


async def send(call: Call, url: str, headers: Any, data: Any) -> Exchange:
    """The request, and for a metered call that does not stream, its whole answer."""
    rec, config = call.record, call.svc.config
    try:
        response = await call.svc.upstreams.request(
            call.request.method, url, headers, data, client_timeout(config.timeouts, rec.stream)
        )
    except Exception as e:
        failure = classify(e, Stage.CONNECT)
        if failure is None:
            raise
        call.maybe_billed = failure.maybe_billed
        raise failure.fault(rec.upstream) from None
    call.timings.head = time.perf_counter()
    if not call.metered or "text/event-stream" in response.headers.get("Content-Type", ""):
        return response, None
    try:
        body = await response.read()
    except Exception as e:
        response.release()
        fault = call.upstream_fault(e)
        if fault is None:
            raise
        raise fault from None
    call.timings.done = time.perf_counter()
    return response, body


def detach(call: Call) -> bool:
    """The client left while a non-streamed call was at the upstream: let it finish
    there (bounded by timeouts.read) and record the provider's usage."""
    task = call.exchange_task
    if task is None or task.done() or call.svc.shutting_down:  # a task: metered, not a stream
        if task is not None and not task.done():
            task.cancel()
        return False
    call.client_gone = True
    finishing = asyncio.ensure_future(_finish_detached(call, task))
    call.svc.inflight.add(finishing)  # a shutdown waits for it, then cancels it
    finishing.add_done_callback(call.svc.inflight.discard)
    return True


async def _finish_detached(call: Call, task: asyncio.Task[Exchange | None]) -> None:
    rec = call.record
    try:
        exchange = await task
        assert exchange is not None  # its answer was not taken: the task keeps it
        response, body = exchange
        try:
            if body is None:  # it streams: streams are cut with their client
                response.close()
                rec.error = "cancelled: the client disconnected"
                call.record_abnormal()
                return
            await relay.meter_json(call, response, body)
            rec.status = 499
            rec.error = (rec.error + "; " if rec.error else "") + (
                "client disconnected; the upstream's answer was recorded")  # fmt: skip
            await call.commit()
        finally:
            response.release()
    except ProxyFault as fault:
        rec.status, rec.error = 499, f"client disconnected; then {fault.code}: {fault.message}"
        if call.ticket is not None and not call.ticket.settled:
            call.price_usage(await call.estimate([]) if call.maybe_billed and call.price
                             else None)  # fmt: skip
        await call.commit()
    finally:
        if not call.recorded:
            call.record_abnormal()
