"""The metered call: attribute, admit, forward, relay, meter, price, settle, record.

Every request under /v1/ becomes one `Call`. Whatever happens (client error, refusal,
upstream fault, client gone, cancellation) it ends with exactly one ledger row, and the
budget reservation it took is settled exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from typing import Any

import orjson
from aiohttp import (
    ClientConnectorError,
    ClientError,
    ClientResponse,
    ConnectionTimeoutError,
    web,
)

from proxy.attribution import UNAUTHENTICATED, identify
from proxy.config import Upstream
from proxy.counters import Ticket
from proxy.enforcer import Refusal
from proxy.errors import BUDGET_ERROR, UNAVAILABLE_ERROR, ProxyFault
from proxy.money import usd_exact
from proxy.pricing import ModelPrice
from proxy.records import CallRecord
from proxy.services import SERVICES, Services
from proxy.sse import StreamMeter
from proxy.tokens import PromptText
from proxy.upstream import (
    check_tail,
    client_timeout,
    request_headers,
    response_headers,
    upstream_url,
)
from proxy.usage import ESTIMATED, NONE, Usage, facts_from_body, output_texts

log = logging.getLogger("meterproxy.proxy")

METERED = frozenset({"chat/completions", "completions", "embeddings", "responses"})
_USAGE_CHUNK_ENDPOINTS = frozenset({"chat/completions", "completions"})
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_SECRET = re.compile(r"(sk|pk|rk|key)-[A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
_SYNC_ESTIMATE_CHARS = 65_536


def redact(text: str) -> str:
    """Provider errors may echo part of a key ('Incorrect API key provided: sk-ab***yz')."""
    return _SECRET.sub(lambda m: f"{m.group(1)}-***", text)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    task = asyncio.current_task()
    assert task is not None
    svc.inflight.add(task)
    try:
        return await Call(svc, request).run()
    finally:
        svc.inflight.discard(task)


class Call:
    def __init__(self, svc: Services, request: web.Request) -> None:
        self.svc = svc
        self.request = request
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.ticket: Ticket | None = None
        self.meter: StreamMeter | None = None
        self.body: dict[str, Any] | None = None
        self.price: ModelPrice | None = None
        self.recorded = False
        self.prepared = False  # response headers sent: no error response possible any more
        self.forwarded = False  # the request went to the upstream (or was on its way)
        self.t_sent: float | None = None
        self.t_upstream_done: float | None = None
        self.maybe_billed = False  # forwarded, then no answer: tokens unknown, not zero
        self.record = CallRecord(
            id=svc.new_id(),
            started_at=svc.clock(),
            ended_at=0.0,
            agent=svc.config.default_agent,
            intent=None,
            upstream=None,
            endpoint=request.match_info.get("tail", ""),
            method=request.method,
            model_requested=None,
            model_served=None,
            model_priced=None,
            status=0,
            stream=False,
            input_tokens=0,
            cached_input_tokens=0,
            output_tokens=0,
            reasoning_tokens=0,
            cache_write_tokens=0,
            cost_pico=0,
            usage_source=NONE,
            service_tier=None,
            price_version=None,
            latency_ms=0.0,
            ttfb_ms=None,
            error=None,
            llm_calls=0,
            refused=False,
            reserved_pico=0,
        )

    # -- the whole call ---------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        try:
            return await self._run()
        except ProxyFault as fault:
            return await self._answer_fault(fault)
        except Exception as e:
            if self.prepared:
                raise  # bytes went out already: aiohttp can only close the connection
            log.exception("unexpected error in call %s", self.record.id)
            return await self._answer_fault(
                ProxyFault(
                    500,
                    "internal_error",
                    f"meterproxy: internal error ({type(e).__name__}); the call is recorded"
                    f" as {self.record.id}",
                )
            )
        finally:
            if not self.recorded:
                # Cancelled (shutdown past its grace) or a bug: still one row, still settled.
                self._record_abnormal()

    async def _run(self) -> web.StreamResponse:
        svc, request, rec = self.svc, self.request, self.record
        config = svc.config
        raw_tail = _raw_tail(request)
        check_tail(raw_tail)
        try:
            caller = identify(
                request.headers,
                request.match_info.get("agent"),
                keys=svc.keys,
                agent_header=config.agent_header,
                intent_header=config.intent_header,
                default_agent=config.default_agent,
            )
        except ProxyFault as fault:
            if fault.status == 401:
                rec.agent = UNAUTHENTICATED
            raise
        rec.agent, rec.intent = caller.agent, caller.intent

        metered = request.method == "POST" and rec.endpoint in METERED
        raw_body: bytes | None = None
        model: str | None = None
        if metered:
            raw_body = await self._read_body()
            self.body = body = _parse_json(raw_body)
            model = _model_of(body)
            rec.model_requested = model
            rec.stream = body.get("stream") is True
            self.price = svc.prices.resolve(model)
            rec.price_version = svc.prices.version
            if self.price is None:
                self._unknown_model(model)
            else:
                rec.model_priced = self.price.name
        upstream = config.upstream_for(model)
        rec.upstream = upstream.name

        worst = 0
        if self.price is not None and svc.enforcer.needs_estimate(rec.agent):
            worst = await self._worst_case()
        digest = None
        if svc.enforcer.loop_guard_applies(rec.agent):
            digest = hashlib.blake2b(
                raw_body if raw_body is not None else raw_tail.encode(), digest_size=16
            ).digest()
        admitted = await svc.enforcer.admit(
            rec.agent, rec.intent, worst, svc.clock(), digest, call_id=rec.id
        )
        if isinstance(admitted, Refusal):
            raise _budget_fault(admitted)
        self.ticket = admitted
        rec.reserved_pico = worst

        strip_usage = False
        if metered and self.body is not None and rec.stream:
            raw_body, strip_usage = _ask_for_usage(self.body, raw_body, rec.endpoint, upstream)
        return await self._forward(upstream, raw_tail, raw_body, metered, strip_usage)

    async def _read_body(self) -> bytes:
        try:
            if self.request.content.is_eof():  # all here already: the usual case
                return await self.request.read()
            async with asyncio.timeout(self.svc.config.body_timeout):
                return await self.request.read()
        except TimeoutError:
            raise ProxyFault(
                408,
                "request_timeout",
                f"meterproxy: the request body did not arrive within"
                f" {self.svc.config.body_timeout:g}s",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            limit = self.svc.config.max_body_bytes
            raise ProxyFault(
                413,
                "request_too_large",
                f"meterproxy: the request body is larger than max_body_bytes ({limit} bytes)",
            ) from None

    def _unknown_model(self, model: str) -> None:
        config = self.svc.config
        if config.unknown_model == "block":
            raise ProxyFault(
                400,
                "unknown_model",
                f"meterproxy: model '{model}' has no price in {config.pricing_path};"
                " add it there (or set pricing.unknown_model: allow) and retry",
                param="model",
            )
        if model not in self.svc.warned_models and len(self.svc.warned_models) < 10_000:
            self.svc.warned_models.add(model)
            log.warning(
                "model %r has no price in %s: its calls are recorded as unpriced",
                model,
                config.pricing_path,
            )
        self.record.cost_pico = None

    async def _worst_case(self) -> int:
        """Prompt tokens (with a margin) x input price + output cap x output price."""
        assert self.price is not None and self.body is not None
        config, body = self.svc.config, self.body
        prompt = await self.svc.tokens.count_prompt_async(self.record.model_requested, body)
        margin = int(config.reserve_input_margin * 1_000_000)
        input_tokens = prompt + -(-prompt * margin // 1_000_000)
        cap = 0
        if self.record.endpoint != "embeddings":
            cap = next(
                (int(body[k]) for k in _OUTPUT_CAPS if _positive_int(body.get(k))),
                self.price.max_output or config.reserve_output_tokens,
            )
            choices = int(body["n"]) if _positive_int(body.get("n")) else 1
            best_of = int(body["best_of"]) if _positive_int(body.get("best_of")) else 1
            cap *= max(choices, best_of)
        return self.price.worst_case(input_tokens, cap)

    # -- forwarding -------------------------------------------------------------------

    async def _forward(
        self,
        upstream: Upstream,
        raw_tail: str,
        raw_body: bytes | None,
        metered: bool,
        strip_usage: bool,
    ) -> web.StreamResponse:
        svc, request, rec = self.svc, self.request, self.record
        config = svc.config
        headers = request_headers(
            request.headers,
            upstream,
            drop=(config.agent_header, config.intent_header),
            replace_credentials=bool(svc.keys),
            identity_encoding=metered,
        )
        data: Any = raw_body
        if raw_body is None and request.body_exists:
            data = request.content  # unmetered uploads stream through, never buffered
        rec.llm_calls = 1 if metered else 0
        assert svc.session is not None
        self.forwarded = True
        self.t_sent = time.perf_counter()
        try:
            response = await svc.session.request(
                request.method,
                upstream_url(upstream, raw_tail, request.query_string),
                headers=headers,
                data=data,
                timeout=client_timeout(config.timeouts, rec.stream),
                allow_redirects=False,
            )
        except ConnectionTimeoutError:
            raise self._upstream_fault(
                504, "upstream_timeout", "did not accept a connection in time"
            ) from None
        except TimeoutError:
            self.maybe_billed = True  # the request went out: the provider may bill for it
            raise self._upstream_fault(504, "upstream_timeout", "did not answer in time") from None
        except ClientConnectorError as e:
            raise self._upstream_fault(
                502, "upstream_unreachable", f"is unreachable: {e}"
            ) from None
        except ClientError as e:
            raise self._upstream_fault(502, "upstream_error", f"failed: {e}") from None
        self.t_first = time.perf_counter()
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                rec.stream = True
                return await self._relay_stream(response, strip_usage)
            if metered:
                return await self._relay_metered(response)
            return await self._relay_raw(response)
        finally:
            response.release()

    def _upstream_fault(self, status: int, code: str, what: str) -> ProxyFault:
        upstream = self.record.upstream
        return ProxyFault(status, code, f"meterproxy: upstream '{upstream}' {what}")

    async def _relay_metered(self, response: ClientResponse) -> web.StreamResponse:
        rec = self.record
        try:
            data = await response.read()
            self.t_upstream_done = time.perf_counter()
        except TimeoutError:
            self.maybe_billed = True
            raise self._upstream_fault(504, "upstream_timeout", "stalled mid-body") from None
        except ClientError as e:
            self.maybe_billed = True
            raise self._upstream_fault(502, "upstream_error", f"cut the body: {e}") from None
        rec.status = response.status
        if 200 <= response.status < 300:
            obj = _loads(data)
            facts = facts_from_body(obj)
            rec.model_served = facts.model
            if facts.usage is not None:
                self._price(facts.usage)
            else:
                if obj is None:
                    rec.error = "upstream body is not JSON"
                    texts = [data.decode("utf-8", "replace")]
                else:
                    rec.error = facts.usage_error
                    texts = list(output_texts(obj))
                self._price(await self._estimate(texts))
        else:
            rec.error = _upstream_error_text(response.status, data)
            self._price(None)
        headers = response_headers(response.headers)
        headers["x-meter-request-id"] = rec.id
        headers["x-meter-cost-usd"] = (
            usd_exact(rec.cost_pico) if rec.cost_pico is not None else "unpriced"
        )
        await self._commit()
        return web.Response(status=response.status, body=data, headers=headers)

    async def _relay_stream(
        self, response: ClientResponse, strip_usage: bool
    ) -> web.StreamResponse:
        rec, config = self.record, self.svc.config
        out = web.StreamResponse(status=response.status, headers=response_headers(response.headers))
        out.headers["x-meter-request-id"] = rec.id
        await out.prepare(self.request)
        self.prepared = True
        meter = self.meter = StreamMeter(strip_usage)
        cut: str | None = None
        client_gone = False
        first = True
        try:
            async for chunk in response.content.iter_any():
                if first:
                    self.t_first = time.perf_counter()
                    first = False
                data = meter.feed(chunk)
                if data:
                    await out.write(data)
        except TimeoutError:
            cut = f"upstream stream idle for more than {config.timeouts.stream_idle:g}s"
        except ConnectionResetError:
            client_gone = True
        except ClientError as e:
            cut = f"upstream stream cut: {type(e).__name__}"
        self.t_upstream_done = time.perf_counter()
        rec.status = response.status
        rec.model_served = meter.model
        usage = meter.facts.usage
        if not 200 <= response.status < 300:
            rec.error = "upstream stream answered an error"
            usage = None
            self._price(None)
        elif usage is None:
            rec.error = meter.facts.usage_error
            usage = await self._estimate(meter.generated_texts(), meter.overflow_chars)
            self._price(usage)
        else:
            self._price(usage)
        if client_gone:
            rec.error = "client disconnected mid-stream"
        elif cut:
            rec.error = cut
        await self._commit()
        if client_gone or cut:
            # Mirror the cut: close without the final chunk, so the client sees a broken
            # stream, not one that ended cleanly.
            if self.request.transport is not None:
                self.request.transport.close()
            return out
        # The held final event and the end, in one write. The row is committed: a client
        # that leaves during this last write loses nothing of ours.
        with contextlib.suppress(ConnectionResetError):
            await out.write_eof(meter.finish())
        return out

    async def _relay_raw(self, response: ClientResponse) -> web.StreamResponse:
        """Unmetered paths: bytes through as they come; the last chunk waits for the row."""
        rec = self.record
        out = web.StreamResponse(status=response.status, headers=response_headers(response.headers))
        out.headers["x-meter-request-id"] = rec.id
        if response.content_length is not None:
            out.content_length = response.content_length
        rec.status = response.status
        self._price(None)
        await out.prepare(self.request)
        self.prepared = True
        pending = b""
        try:
            async for chunk in response.content.iter_any():
                if pending:
                    await out.write(pending)
                pending = chunk
        except TimeoutError:
            rec.error = "upstream stalled mid-body"
        except ConnectionResetError:
            rec.error = "client disconnected"
        except ClientError as e:
            rec.error = f"upstream body cut: {type(e).__name__}"
        await self._commit()
        if rec.error:
            if self.request.transport is not None:
                self.request.transport.close()
            return out
        try:
            if pending:
                await out.write(pending)
            await out.write_eof()
        except ConnectionResetError:
            pass
        return out

    # -- metering and recording -------------------------------------------------------

    async def _estimate(self, texts: list[str], overflow_chars: int = 0) -> Usage:
        """Usage from tiktoken when the provider sent none: never 0 for unknown tokens."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = await tokens.count_prompt_async(model, self.body) if self.body else 0
        # Deltas are joined first: a word split over two chunks is one token, not two.
        joined = ["".join(texts)] if texts else []
        output = await tokens.count_texts_async(model, joined) + -(-overflow_chars // 4)
        return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)

    def _estimate_now(self) -> Usage:
        """The estimate for a cancelled call: synchronous (no await is possible any more),
        so big texts are estimated at 4 characters a token instead of being tokenized."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = output = 0
        if self.body:
            text = PromptText(self.body)
            prompt = (
                tokens.count(model, text.texts) + text.fixed_tokens
                if text.chars <= _SYNC_ESTIMATE_CHARS
                else text.chars // 4 + text.fixed_tokens
            )
        if self.meter is not None:
            generated = "".join(self.meter.generated_texts())
            chars = len(generated) + self.meter.overflow_chars
            output = (
                tokens.count(model, [generated]) + -(-self.meter.overflow_chars // 4)
                if chars <= _SYNC_ESTIMATE_CHARS
                else -(-chars // 4)
            )
        return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)

    def _price(self, usage: Usage | None) -> None:
        """Set tokens and cost on the row and settle the reservation."""
        rec = self.record
        if usage is None:
            rec.cost_pico = 0
        else:
            rec.set_usage(usage)
            rec.cost_pico = self.price.cost(usage) if self.price is not None else None
        self._settle()

    def _settle(self) -> None:
        if self.ticket is not None:
            self.svc.enforcer.settle(self.ticket, self.record.cost_pico, self.svc.clock())

    def _finish_row(self) -> None:
        rec = self.record
        now = time.perf_counter()
        rec.ended_at = self.svc.clock()
        rec.latency_ms = round((now - self.t0) * 1000, 3)
        if self.t_first is not None:
            rec.ttfb_ms = round((self.t_first - self.t0) * 1000, 3)
        self.recorded = True

    async def _commit(self) -> None:
        self._finish_row()
        await self.svc.ledger.commit(self.record)
        self._log()

    def _log(self) -> None:
        upstream_seconds = None
        if self.t_sent is not None and self.t_upstream_done is not None:
            upstream_seconds = self.t_upstream_done - self.t_sent
        self.svc.after_call(self.record, upstream_seconds, self.forwarded)

    def _record_abnormal(self) -> None:
        rec = self.record
        if rec.status == 0:
            rec.status = 499  # the client's request ended before an answer (nginx's code)
        if rec.error is None:
            rec.error = (
                "cancelled at shutdown"
                if self.svc.shutting_down
                else "cancelled: the client disconnected"
            )
        if self.ticket is not None and not self.ticket.settled:
            if self.forwarded and self.price is not None:
                self._price(self._estimate_now())
            else:
                self._price(None)
        self._finish_row()
        self.svc.ledger.submit(self.record)
        self._log()

    async def _answer_fault(self, fault: ProxyFault) -> web.StreamResponse:
        rec = self.record
        rec.status = fault.status
        rec.error = f"{fault.code}: {fault.message}"
        rec.refused = fault.type in (BUDGET_ERROR, UNAVAILABLE_ERROR)
        if self.ticket is not None and not self.ticket.settled:
            # Nothing reached the provider, or it did and never answered: then estimate.
            self._price(await self._estimate([]) if self.maybe_billed and self.price else None)
        elif rec.cost_pico is not None:
            rec.cost_pico = 0
        await self._commit()
        response = fault.response({"x-meter-request-id": rec.id})
        if fault.status in (408, 413):
            response.force_close()  # the rest of the body was never read: drop it with us
        return response


# -- helpers ------------------------------------------------------------------------------


def _raw_tail(request: web.Request) -> str:
    """The still-encoded path after `/v1/`, exactly as the client sent it."""
    path = request.raw_path.split("?", 1)[0]
    index = path.find("/v1/")
    return path[index + 4 :] if index >= 0 else ""


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProxyFault(
            400, "invalid_json", f"meterproxy: the request body is not valid JSON ({e})"
        ) from None
    if not isinstance(body, dict):
        raise ProxyFault(400, "invalid_json", "meterproxy: the request body must be a JSON object")
    return body


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise ProxyFault(
            400, "missing_model", "meterproxy: the request has no 'model'", param="model"
        )
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        raise ProxyFault(
            400,
            "invalid_model",
            f"meterproxy: 'model' must be a non-empty string, got {type(model).__name__}",
            param="model",
        )
    return model


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ask_for_usage(
    body: dict[str, Any], raw: bytes | None, endpoint: str, upstream: Upstream
) -> tuple[bytes | None, bool]:
    """Ask a stream for its usage chunk when the client did not; strip it on the way back."""
    if endpoint not in _USAGE_CHUNK_ENDPOINTS or not upstream.inject_usage:
        return raw, False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return raw, False
    patched = dict(body)
    patched["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}  # fmt: skip
    return orjson.dumps(patched), True


def _upstream_error_text(status: int, data: bytes) -> str:
    obj = _loads(data)
    message = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        message = obj["error"].get("message")
    if not isinstance(message, str):
        message = data[:200].decode("utf-8", "replace")
    return redact(f"upstream {status}: {message[:300]}")


def _budget_fault(refusal: Refusal) -> ProxyFault:
    type_ = BUDGET_ERROR if refusal.status == 429 else UNAVAILABLE_ERROR
    return ProxyFault(
        refusal.status, refusal.code, refusal.message, type_=type_, headers=refusal.headers()
    )
