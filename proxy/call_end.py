"""How a call ends: its row committed exactly once, its log line and observers after it,
and a fault answered to the client in the API's own error shape."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.call_cost import estimate_now, price_usage, settle_unanswered
from proxy.call_state import Phase
from proxy.errors import BUDGET_ERROR, UNAVAILABLE_ERROR, ProxyFault

if TYPE_CHECKING:
    from proxy.call import Call

log = logging.getLogger("meterproxy.proxy")


def finish_row(call: Call) -> None:
    rec, t = call.record, call.timings
    now = time.perf_counter()
    rec.ended_at = call.svc.clock()
    rec.latency_ms = round((now - t.start) * 1000, 3)
    if t.head is not None:  # time to the upstream's first byte, on every path
        rec.ttfb_ms = round((t.head - t.start) * 1000, 3)
    if t.done is None and t.sent is not None:
        t.done = now


async def commit(call: Call) -> None:
    finish_row(call)
    call.phase = Phase.RECORDED
    try:
        await call.svc.ledger.commit(call.record)
    finally:
        # The log line and the observers describe a finished call, so they wait for
        # the next turn of the loop: the caller writes the answer (or its last bytes)
        # in this one, and the client does not wait for them (70 us a call after an
        # idle gap). A client that hangs up meanwhile cancels the wait, not the row
        # (the ledger holds it): its line and its metrics still follow.
        asyncio.get_running_loop().call_soon(_observe_after, call)


def _observe_after(call: Call) -> None:
    try:
        observe(call)
    except Exception:
        log.exception("observing call %s", call.record.id)


def observe(call: Call) -> None:
    forwarded = call.timings.sent is not None
    rec = call.record
    headers = call.request.headers
    trace = None
    if "traceparent" in headers:
        trace = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    call.svc.after_call(rec, call.timings.upstream_seconds, forwarded, trace)
    if call.outcome is not None and rec.intent is not None:
        closing = call.svc.close_intent(rec.agent, rec.intent, call.outcome, "header",
                                        rec.ended_at)  # fmt: skip
        call.svc.chore(closing, "recording an intent's outcome")


def record_abnormal(call: Call) -> None:
    rec = call.record
    if rec.status == 0:
        rec.status = 499  # the client's request ended before an answer (nginx's code)
    if rec.error is None:
        rec.error = (
            "cancelled at shutdown"
            if call.svc.shutting_down
            else "cancelled: the client disconnected"
        )
    if call.ticket is not None and not call.ticket.settled:
        if call.timings.sent is not None and call.price is not None:
            price_usage(call, estimate_now(call))
        else:
            price_usage(call, None)
    finish_row(call)
    call.phase = Phase.RECORDED
    call.svc.ledger.submit(rec)
    observe(call)


async def answer_fault(call: Call, fault: ProxyFault) -> web.StreamResponse:
    rec = call.record
    rec.status = fault.status
    rec.error = f"{fault.code}: {fault.message}"
    rec.refused = fault.type in (BUDGET_ERROR, UNAVAILABLE_ERROR)
    if call.ticket is not None and not call.ticket.settled:
        await settle_unanswered(call)
    elif rec.cost_pico is not None:
        rec.cost_pico = 0
    await commit(call)
    headers = {**fault.headers, "x-meter-request-id": rec.id}
    shape = call.route.shape if call.route is not None else None
    body = (
        shape.error_body(fault.status, fault.type, fault.code, fault.message, fault.param)
        if shape is not None
        else fault.body()
    )
    response = web.Response(status=fault.status, body=body, headers=headers,
                            content_type="application/json")  # fmt: skip
    if fault.status in (408, 413):
        response.force_close()  # the rest of the body was never read: drop it with us
    return response
