"""How an upstream's answer reaches the client: a metered body, or bytes passed through
(a metered stream is `proxy.relay_stream`). Each ends with the call's row committed
before its last byte goes out (the durability promise), and each mirrors an upstream
that fails mid-way."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from proxy.call_cost import estimate, price_usage, reprice
from proxy.call_end import commit
from proxy.decoding import DecodeError, decode_all
from proxy.http1 import Response
from proxy.money import usd_exact
from proxy.redact import redact
from proxy.security import allow_reading
from proxy.shapes.base import Kind
from proxy.upstream import response_headers
from proxy.usage import ESTIMATED

if TYPE_CHECKING:
    from proxy.call import Call

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
        price_usage(call, None)
        return
    error = None
    try:
        body = decode_all(data, response.headers.get("Content-Encoding"))
    except DecodeError as e:
        body, error = b"", f"upstream body is {e}"
    obj = _loads(body) if body else None
    facts = shape.body_facts(ep, obj)
    rec.model_served = facts.model
    reprice(call, facts.model)
    if not await call.absorb(facts):
        return  # a background response: billed when it finishes
    if ep.kind is Kind.SPEECH:  # audio bytes back: the characters sent are the measure
        rec.usage_source = REQUEST
        price_usage(call, None, call.facts.units)
        return
    units = facts.units
    if ep.kind is Kind.TRANSCRIPTION and facts.usage is None and units is None:
        units = call.facts.units  # seconds from the file: exact for WAV, FLAC, CBR MP3
        rec.usage_source = ESTIMATED
        rec.error = f"no usage or duration in the answer: billed for {units}s, from the file"
    if facts.usage is not None or units is not None:
        price_usage(call, facts.usage, units)
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
    price_usage(call, await estimate(call, texts))


async def json(call: Call, response: Response, data: bytes) -> web.StreamResponse:
    """A metered answer that does not stream: metered whole, sent with its cost."""
    await meter_json(call, response, data)
    rec = call.record
    headers = response_headers(response.headers)
    headers["x-meter-request-id"] = rec.id
    headers["x-meter-cost-usd"] = (
        usd_exact(rec.cost_pico) if rec.cost_pico is not None else "unpriced"
    )
    if len(data) > 1 and len(call.svc.inflight) <= 1:
        return await _all_but_the_last_byte_first(call, response.status, headers, data)
    await commit(call)
    call.response = web.Response(status=response.status, body=data, headers=headers)
    return call.response


async def _all_but_the_last_byte_first(
    call: Call, status: int, headers: CIMultiDict[str], data: bytes
) -> web.StreamResponse:
    """The answer goes out while its row commits, all but its last byte, which waits for
    the commit (the same promise as a stream's last event). Only for a call alone on the
    proxy: the row's commit there is a cold hop to the writer thread and back (70 us
    after a 50 ms gap, against 10 us under load), and the client reads the rest of the
    answer meanwhile (-0.11 ms p50 at 20 calls/s). Under load one write is cheaper."""
    out, _ = await prepared(call, status, headers, len(data))
    try:
        await out.write(data[:-1])
    except ConnectionResetError:
        call.client_gone = True
    await commit(call)
    if call.client_gone:
        return out
    try:
        await out.write(data[-1:])
        await out.write_eof()
    except ConnectionResetError:
        pass
    return out


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
    price_usage(call, None)
    with contextlib.suppress(DecodeError):
        body = decode_all(data, response.headers.get("Content-Encoding"))
        assert call.route is not None
        await call.observed(call.route.shape.body_facts(call.route.endpoint, _loads(body)))
    headers = response_headers(response.headers)
    headers["x-meter-request-id"] = rec.id
    await commit(call)
    call.response = web.Response(status=response.status, body=data, headers=headers)
    return call.response


async def prepared(
    call: Call, status: int, headers: CIMultiDict[str], length: int | None = None
) -> tuple[web.StreamResponse, AbstractStreamWriter]:
    """A response that goes out as the upstream's comes in: its head sent now."""
    out = web.StreamResponse(status=status, headers=headers)
    out.headers["x-meter-request-id"] = call.record.id
    if length is not None:
        out.content_length = length
    allow_reading(call.request, out)
    call.response = out
    writer = await out.prepare(call.request)
    assert writer is not None  # None only for a response prepared twice
    return out, writer


# -- bytes through -------------------------------------------------------------------------


async def raw(
    call: Call, response: Response, *, estimated: bool = False, first: bytes = b""
) -> web.StreamResponse:
    """Unmetered paths (and a stream the proxy cannot decode): bytes through as they come,
    after `first` (what was read already); the last chunk waits for the row."""
    rec = call.record
    rec.status = response.status
    if not estimated:
        price_usage(call, None)
        if call.unpriced and 200 <= response.status < 300:
            rec.cost_pico = None  # it bills; what, the proxy cannot know
    out, _ = await prepared(
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
    if estimated:
        price_usage(call, await estimate(call, []))
    if error:
        rec.error = error
    await commit(call)
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
