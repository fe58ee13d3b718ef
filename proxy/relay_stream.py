"""A metered stream, relayed: each piece the upstream sends is metered and written to the
client inside the upstream connection's callback (`http1.Response.pump`), so no task
wakes up per piece. The relay's coroutine steps in only to wait: for the budget's next
slice, for a slow client to drain, for the upstream's end after the final event. The
row is committed before the final event goes out (the durability promise); an upstream
that fails mid-way is mirrored to the client as a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from proxy.call_cost import estimate, price_usage, reprice
from proxy.call_end import commit
from proxy.decoding import DecodeError, Decoder, decoder
from proxy.enforcer import Refusal
from proxy.errors import BUDGET_ERROR
from proxy.http1 import Response
from proxy.relay import prepared, raw
from proxy.sse import AFTER_FINAL_BYTES, StreamMeter
from proxy.stream_budget import StreamBudget
from proxy.upstream import response_headers

if TYPE_CHECKING:
    from proxy.call import Call

# After a stream's final event: how long to wait for the upstream's end (it is normally
# already there), before cutting the connection instead.
AFTER_FINAL_SECONDS = 1.0
# The client's unsent bytes past which the relay stops and waits for it to drain (the
# transports' own high-water mark: past it, aiohttp's drain() waits).
_CLIENT_HIGH = 64 * 1024
_JOIN_BELOW = 16 * 1024  # a chunk frame smaller than this is one bytes object, not three


class _Piecewise:
    """What happens to each piece the upstream sends: metered, and written to the client
    as aiohttp would (chunked, or as is for an HTTP/1.0 client). Returns False when the
    relay's coroutine must step in, and says why."""

    __slots__ = ("budget", "budget_due", "chunked", "client_gone", "decode", "draining",
                 "meter", "transport")  # fmt: skip

    def __init__(
        self, meter: StreamMeter, decode: Decoder | None, budget: StreamBudget | None,
        transport: asyncio.Transport, chunked: bool,
    ) -> None:  # fmt: skip
        self.meter = meter
        self.decode = decode
        self.budget = budget
        self.transport = transport
        self.chunked = chunked
        self.budget_due = False  # the budget must look (near the end of the reservation)
        self.draining = False  # the client is behind: wait for it
        self.client_gone = False

    def __call__(self, piece: bytes) -> bool:
        meter = self.meter
        data = meter.feed(piece if self.decode is None else self.decode.decode(piece))
        transport = self.transport
        if data:
            if transport.is_closing():
                self.client_gone = True
                return False
            if not self.chunked:
                transport.write(data)
            elif len(data) < _JOIN_BELOW:
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        if meter.final_seen:
            return False
        budget = self.budget
        if budget is not None and budget.note(meter.take_fresh()):
            self.budget_due = True
            return False
        if data and transport.get_write_buffer_size() > _CLIENT_HIGH:
            self.draining = True
            return False
        return True


async def stream(call: Call, response: Response, strip_usage: bool) -> web.StreamResponse:
    rec, config = call.record, call.svc.config
    assert call.route is not None
    shape, ep = call.route.shape, call.route.endpoint
    headers = response_headers(response.headers)
    try:
        decode = decoder(response.headers.get("Content-Encoding"))
    except DecodeError as e:
        rec.error = f"upstream stream is {e}"
        return await raw(call, response, estimated=True)
    if decode is not None:
        # Events are read, and may be changed (a usage chunk dropped, a cut): the client
        # gets them decoded, as it would from an upstream that honoured identity.
        headers.popall("Content-Encoding", None)
    out, writer = await prepared(call, response.status, headers)
    budget = call.stream_budget
    meter = call.meter = StreamMeter(shape.stream_reader(ep, strip_usage),
                                     count_output=budget is not None)  # fmt: skip
    cut: str | None = None
    refusal = None
    client_gone = False
    try:
        refusal, client_gone = await _relay(call, response, out, writer, meter, decode)
        if meter.final_seen and not response.at_eof():
            cut = await _after_final(meter, response, decode)
    except TimeoutError:
        cut = f"upstream stream idle for more than {config.timeouts.stream_idle:g}s"
    except ConnectionResetError:
        client_gone = True
    except DecodeError as e:
        cut = f"upstream stream is {e}"
    except Exception as e:
        if call.upstream_fault(e) is None:
            raise
        cut = f"upstream stream cut: {type(e).__name__}"
    if refusal is not None:
        response.close()  # the provider stops generating (and billing) when we hang up
    call.timings.done = time.perf_counter()
    if budget is not None:
        await budget.settled()
    await _meter(call, response, meter)
    if refusal is not None:
        rec.error = f"stream cut by the budget: {refusal.message}"
    elif client_gone:
        rec.error = "client disconnected mid-stream"
    elif cut:
        rec.error = cut
    await commit(call)
    if refusal is not None:
        message = (f"meterproxy: {refusal.message}. The stream was cut here: what it generated"
                   " up to this point is billed")  # fmt: skip
        with contextlib.suppress(ConnectionResetError):
            await out.write_eof(shape.cut_event(ep, BUDGET_ERROR, refusal.code, message))
        return out
    if client_gone or (cut and not meter.final_seen):
        # Mirror the cut: close without the final event, so the client sees a broken
        # stream, not one that ended cleanly.
        if call.request.transport is not None:
            call.request.transport.close()
        return out
    # The held final event and the end, in one write. The row is committed: a client
    # that leaves during this last write loses nothing of ours.
    with contextlib.suppress(ConnectionResetError):
        await out.write_eof(meter.finish())
    return out


async def _relay(
    call: Call, response: Response, out: web.StreamResponse, writer: AbstractStreamWriter,
    meter: StreamMeter, decode: Decoder | None,
) -> tuple[Refusal | None, bool]:  # fmt: skip
    """The body up to its final event, its end, or a cut: (the budget's refusal, whether
    the client left)."""
    transport = call.request.transport
    if transport is None or transport.is_closing():
        return None, True
    budget = call.stream_budget
    # aiohttp sent the head when the response was prepared: what follows is the body,
    # framed as its headers say.
    chunked = out.headers.get("Transfer-Encoding", "").lower() == "chunked"
    step = _Piecewise(meter, decode, budget, transport, chunked)
    while True:
        await response.pump(step)
        if step.client_gone or meter.final_seen or response.at_eof():
            return None, step.client_gone
        if step.budget_due:
            step.budget_due = False
            assert budget is not None
            refusal = await budget.after()
            if refusal is not None:
                # What came in while the budget was asked was generated, so it is billed:
                # it is metered and passed on before the hang-up.
                step(response.read_nowait())
                # The stream ended meanwhile: nothing was cut.
                return (None if meter.final_seen else refusal), step.client_gone
        if step.draining:  # the client is behind: until its transport takes more
            step.draining = False
            await writer.drain()


async def _meter(call: Call, response: Response, meter: StreamMeter) -> None:
    """Usage and cost of what the stream carried, onto the call's row."""
    rec = call.record
    assert call.route is not None
    rec.status = response.status
    rec.model_served = meter.model
    reprice(call, meter.model)
    facts = meter.facts
    facts.response_id = facts.response_id or getattr(meter.reader, "response_id", None)
    if not 200 <= response.status < 300:
        rec.error = "upstream stream answered an error"
        price_usage(call, None)
    elif facts.usage is None:
        rec.error = facts.usage_error
        await call.absorb(facts)
        price_usage(call, await estimate(call, meter.generated_texts(), meter.overflow_chars))
    elif await call.absorb(facts):
        price_usage(call, facts.usage)
    if facts.usage is not None and call.route.endpoint.name == "responses/retrieve":
        await call.observed(facts)


async def _after_final(
    meter: StreamMeter, response: Response, decode: Decoder | None
) -> str | None:
    """The upstream's end after the final event, normally there already. What follows the
    final event is kept up to a bound; more, or no end in time, and the upstream
    connection is dropped (nothing after the final event matters to a client)."""
    try:
        async with asyncio.timeout(AFTER_FINAL_SECONDS):
            while not meter.overflow:
                chunk = await response.readany()
                if not chunk:
                    return None
                meter.feed(decode.decode(chunk) if decode is not None else chunk)
    except TimeoutError:
        response.close()
        return None
    response.close()
    return f"upstream sent more than {AFTER_FINAL_BYTES} bytes after the final event; cut"
