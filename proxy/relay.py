"""How an upstream's answer reaches the client: a metered body, a metered stream, or bytes
passed through. Each ends with the call's row committed before its last byte goes out
(the durability promise), and each mirrors an upstream that fails mid-way."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.decoding import DecodeError, Decoder, decode_all, decoder
from proxy.errors import BUDGET_ERROR
from proxy.http1 import Response
from proxy.money import usd_exact
from proxy.redact import redact
from proxy.security import allow_reading
from proxy.shapes.base import Kind
from proxy.sse import AFTER_FINAL_BYTES, StreamMeter
from proxy.upstream import response_headers
from proxy.usage import ESTIMATED

if TYPE_CHECKING:
    from proxy.call import Call

# After a stream's final event: how long to wait for the upstream's end (it is normally
# already there), before cutting the connection instead.
AFTER_FINAL_SECONDS = 1.0
REQUEST = "request"  # usage_source of what the request itself says exactly (characters)
_RETRIEVE_MAX_BYTES = 64 << 20


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def error_text(call: Call, status: int, data: bytes) -> str:
    """An upstream error for the ledger: its message, keys redacted."""
    assert call.route is not None
    message = call.route.shape.upstream_error_message(_loads(data))
    if not isinstance(message, str):
        message = data[:200].decode("utf-8", "replace")
    return redact(f"upstream {status}: {message[:300]}")


# -- a metered body ------------------------------------------------------------------------


async def meter_json(call: Call, response: Response, data: bytes) -> None:
    """Usage and cost of a whole answer, onto the call's row (and its reservation settled)."""
    rec = call.record
    assert call.route is not None
    shape, ep = call.route.shape, call.route.endpoint
    rec.status = response.status
    if not 200 <= response.status < 300:
        rec.error = error_text(call, response.status, data)
        call.price_usage(None)
        return
    error = None
    try:
        body = decode_all(data, response.headers.get("Content-Encoding"))
    except DecodeError as e:
        body, error = b"", f"upstream body is {e}"
    obj = _loads(body) if body else None
    facts = shape.body_facts(ep, obj)
    rec.model_served = facts.model
    call.reprice(facts.model)
    if not await call.absorb(facts):
        return  # a background response: billed when it finishes
    if ep.kind is Kind.SPEECH:  # audio bytes back: the characters sent are the measure
        rec.usage_source = REQUEST
        call.price_usage(None, call.facts.units)
        return
    units = facts.units
    if ep.kind is Kind.TRANSCRIPTION and facts.usage is None and units is None:
        units = call.facts.units  # seconds from the file: exact for WAV, FLAC, CBR MP3
        rec.usage_source = ESTIMATED
        rec.error = f"no usage or duration in the answer: billed for {units}s, from the file"
    if facts.usage is not None or units is not None:
        call.price_usage(facts.usage, units)
        if facts.usage is None and rec.usage_source not in (ESTIMATED,):
            rec.usage_source = "provider"
        return
    if error is not None:
        rec.error = error
        texts: list[str] = []
    elif obj is None:
        rec.error = "upstream body is not JSON"
        texts = [body.decode("utf-8", "replace")]
    else:
        rec.error = facts.usage_error
        texts = list(shape.output_texts(ep, obj))
    call.price_usage(await call.estimate(texts))


async def json(call: Call, response: Response, data: bytes) -> web.StreamResponse:
    """A metered answer that does not stream: metered whole, sent with its cost."""
    await meter_json(call, response, data)
    rec = call.record
    headers = response_headers(response.headers)
    headers["x-meter-request-id"] = rec.id
    headers["x-meter-cost-usd"] = (
        usd_exact(rec.cost_pico) if rec.cost_pico is not None else "unpriced"
    )
    await call.commit()
    call.response = web.Response(status=response.status, body=data, headers=headers)
    return call.response


async def retrieved(call: Call, response: Response) -> web.StreamResponse:
    """`GET responses/{id}`: passed on as it came; a finished background response in it
    has its cost recorded."""
    try:
        data = await response.read(limit=_RETRIEVE_MAX_BYTES)
    except Exception as e:
        fault = call.upstream_fault(e)
        if fault is None:
            raise
        raise fault from None
    if len(data) > _RETRIEVE_MAX_BYTES:  # too big to read for usage: passed on as it comes
        return await raw(call, response, first=data)
    rec = call.record
    rec.status = response.status
    call.price_usage(None)
    with contextlib.suppress(DecodeError):
        body = decode_all(data, response.headers.get("Content-Encoding"))
        assert call.route is not None
        await call.observed(call.route.shape.body_facts(call.route.endpoint, _loads(body)))
    headers = response_headers(response.headers)
    headers["x-meter-request-id"] = rec.id
    await call.commit()
    call.response = web.Response(status=response.status, body=data, headers=headers)
    return call.response


# -- a metered stream ----------------------------------------------------------------------


async def stream(call: Call, response: Response, strip_usage: bool) -> web.StreamResponse:
    rec, config = call.record, call.svc.config
    assert call.route is not None
    shape, ep = call.route.shape, call.route.endpoint
    headers = response_headers(response.headers)
    try:
        decode = decoder(response.headers.get("Content-Encoding"))
    except DecodeError as e:
        rec.error = f"upstream stream is {e}"
        return await raw(call, response, estimate=True)
    if decode is not None:
        # Events are read, and may be changed (a usage chunk dropped, a cut): the client
        # gets them decoded, as it would from an upstream that honoured identity.
        headers.popall("Content-Encoding", None)
    out = await _prepared(call, response.status, headers)
    budget = call.stream_budget
    meter = call.meter = StreamMeter(shape.stream_reader(ep, strip_usage),
                                     count_output=budget is not None)  # fmt: skip
    cut: str | None = None
    refusal = None
    client_gone = False
    try:
        async for chunk in response:
            data = meter.feed(decode.decode(chunk) if decode is not None else chunk)
            if data:
                await out.write(data)
            if meter.final_seen:
                break
            if (
                budget is not None
                and budget.note(meter.take_fresh())
                and (refusal := await budget.after())
            ):
                break
        if refusal is not None:
            # What came in while the budget was asked was generated, so it is billed: it
            # is metered and passed on before the hang-up (left unread, the row missed it
            # and the budget counted less than the provider bills).
            chunk = response.read_nowait()
            data = meter.feed(decode.decode(chunk) if decode is not None else chunk)
            if data:
                await out.write(data)
            if meter.final_seen:  # the stream ended meanwhile: nothing was cut
                refusal = None
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
    rec.status = response.status
    rec.model_served = meter.model
    call.reprice(meter.model)
    facts = meter.facts
    facts.response_id = facts.response_id or getattr(meter.reader, "response_id", None)
    if not 200 <= response.status < 300:
        rec.error = "upstream stream answered an error"
        call.price_usage(None)
    elif facts.usage is None:
        rec.error = facts.usage_error
        await call.absorb(facts)
        call.price_usage(await call.estimate(meter.generated_texts(), meter.overflow_chars))
    elif await call.absorb(facts):
        call.price_usage(facts.usage)
    if facts.usage is not None and ep.name == "responses/retrieve":
        await call.observed(facts)
    if refusal is not None:
        rec.error = f"stream cut by the budget: {refusal.message}"
    elif client_gone:
        rec.error = "client disconnected mid-stream"
    elif cut:
        rec.error = cut
    await call.commit()
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


async def _prepared(
    call: Call, status: int, headers: CIMultiDict[str], length: int | None = None
) -> web.StreamResponse:
    """A response that goes out as the upstream's comes in: its head sent now."""
    out = web.StreamResponse(status=status, headers=headers)
    out.headers["x-meter-request-id"] = call.record.id
    if length is not None:
        out.content_length = length
    allow_reading(call.request, out)
    call.response = out
    await out.prepare(call.request)
    return out


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


# -- bytes through -------------------------------------------------------------------------


async def raw(
    call: Call, response: Response, *, estimate: bool = False, first: bytes = b""
) -> web.StreamResponse:
    """Unmetered paths (and a stream the proxy cannot decode): bytes through as they come,
    after `first` (what was read already); the last chunk waits for the row."""
    rec = call.record
    rec.status = response.status
    if not estimate:
        call.price_usage(None)
        if call.unpriced and 200 <= response.status < 300:
            rec.cost_pico = None  # it bills; what, the proxy cannot know
    out = await _prepared(
        call, response.status, response_headers(response.headers), response.content_length
    )
    pending = first
    error = None
    try:
        async for chunk in response:
            if pending:
                await out.write(pending)
            pending = chunk
    except TimeoutError:
        error = "upstream stalled mid-body"
    except ConnectionResetError:
        error = "client disconnected"
    except Exception as e:
        if call.upstream_fault(e) is None:
            raise
        error = f"upstream body cut: {type(e).__name__}"
    call.timings.done = time.perf_counter()
    if estimate:
        call.price_usage(await call.estimate([]))
    if error:
        rec.error = error
    await call.commit()
    if error:
        if call.request.transport is not None:
            call.request.transport.close()
        return out
    try:
        if pending:
            await out.write(pending)
        await out.write_eof()
    except ConnectionResetError:
        pass
    return out
