"""The metered call's life cycle: route, attribute, admit, forward, relay, settle, record.

Every request under an API prefix becomes one `Call`. Whatever happens (client error,
refusal, upstream fault, client gone, cancellation) it ends with exactly one ledger row,
and its budget reservation is settled exactly once. What an API shape means (paths,
usage, errors) is `proxy.shapes`; how bytes come back is `proxy.relay`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy import relay
from proxy.attribution import UNAUTHENTICATED, identify
from proxy.config import Upstream
from proxy.counters import Ticket
from proxy.enforcer import Refusal
from proxy.errors import BUDGET_ERROR, UNAVAILABLE_ERROR, ProxyFault
from proxy.faults import Stage, classify
from proxy.paths import raw_tail
from proxy.pricing import ModelPrice
from proxy.records import new_record
from proxy.reservation import Reservation, reserve
from proxy.routing import Route, route
from proxy.services import Services
from proxy.shapes.base import JSONObj, Prompt, RequestFacts
from proxy.sse import StreamMeter
from proxy.upstream import client_timeout, request_headers
from proxy.usage import ESTIMATED, Usage

log = logging.getLogger("meterproxy.proxy")
_SYNC_ESTIMATE_CHARS = 65_536
_JSON_TYPES = ("application/json",)
_BROWSER_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")


class Phase(enum.IntEnum):
    RECEIVED = 0  # being read and checked
    ADMITTED = 1  # a budget reservation is held
    FORWARDED = 2  # the request went to the upstream (or is on its way)
    RESPONDING = 3  # the client's response has started: no error answer possible
    RECORDED = 4  # its ledger row is submitted


@dataclass(slots=True)
class Timings:
    start: float
    sent: float | None = None  # the request went to the upstream
    head: float | None = None  # the upstream's response head arrived
    done: float | None = None  # the upstream's last byte arrived

    @property
    def upstream_seconds(self) -> float | None:
        if self.sent is None or self.done is None:
            return None
        return self.done - self.sent


class Call:
    def __init__(self, svc: Services, request: web.Request, prefix: str) -> None:
        self.svc = svc
        self.request = request
        self.prefix = prefix
        self.phase = Phase.RECEIVED
        self.timings = Timings(time.perf_counter())
        self.record = new_record(svc.new_id(), svc.clock(), svc.config.default_agent,
                                 request.match_info.get("tail", ""), request.method)  # fmt: skip
        self.route: Route | None = None
        self.upstream: Upstream | None = None
        self.ticket: Ticket | None = None
        self.reservation: Reservation | None = None
        self.stream_budget: Any = None  # a stream metered as it flows (see proxy.budgets)
        self.meter: StreamMeter | None = None
        self.body: JSONObj | None = None
        self.facts = RequestFacts()
        self.prompt: Prompt | None = None
        self.price: ModelPrice | None = None
        self.maybe_billed = False  # forwarded, then no answer: tokens unknown, not zero
        self.response: web.StreamResponse | None = None

    @property
    def prepared(self) -> bool:
        """Response headers went out: no error response is possible any more."""
        return self.response is not None and self.response.prepared

    # -- the whole call ---------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        try:
            return await self._run()
        except ProxyFault as fault:
            return await self.answer_fault(fault)
        except Exception as e:
            if self.prepared:
                raise  # bytes went out already: aiohttp can only close the connection
            log.exception("unexpected error in call %s", self.record.id)
            return await self.answer_fault(
                ProxyFault(
                    500,
                    "internal_error",
                    f"meterproxy: internal error ({type(e).__name__}); the call is recorded"
                    f" as {self.record.id}",
                )
            )
        finally:
            if self.phase < Phase.RECORDED:
                # Cancelled (shutdown past its grace) or a bug: still one row, still settled.
                self._record_abnormal()

    async def _run(self) -> web.StreamResponse:
        svc, request, rec = self.svc, self.request, self.record
        self.route = r = route(self.prefix, raw_tail(request.rel_url.raw_path, self.prefix),
                               request.method, request.headers)  # fmt: skip
        rec.endpoint = r.endpoint.name if r.endpoint.metered else r.path
        self._identify()
        metered = request.method == "POST" and r.endpoint.metered and r.endpoint.body == "json"
        raw_body: bytes | None = None
        if metered:
            self._check_content_type()
            raw_body = await self._read_body()
            self.body = body = _parse_json(raw_body)
            self.facts = facts = r.shape.request(r.endpoint, body)
            model = _model_of(body, r.endpoint.model)
            rec.model_requested = model
            rec.stream = facts.stream or r.endpoint.stream
            self.price = svc.prices.resolve(model)
            rec.price_version = svc.prices.version
            if self.price is None:
                self._unknown_model(model)
            else:
                rec.model_priced = self.price.name
        self.upstream = upstream = self._upstream()
        rec.upstream = upstream.name
        rec.provider = upstream.provider
        await self._admit(raw_body)
        strip_usage = False
        if metered and self.body is not None and rec.stream and upstream.inject_usage:
            patched = r.shape.ask_for_usage(r.endpoint, self.body)
            if patched is not None:
                raw_body, strip_usage = orjson.dumps(patched), True
        if self.reservation is not None and self.reservation.cap is not None:
            assert self.body is not None
            capped = r.shape.set_cap(r.endpoint, orjson.loads(raw_body or b"{}"),
                                     self.reservation.cap)  # fmt: skip
            raw_body = orjson.dumps(capped)
        return await self._forward(raw_body, metered, strip_usage)

    def _identify(self) -> None:
        svc, request, rec = self.svc, self.request, self.record
        config = svc.config
        try:
            caller = identify(
                request.headers,
                request.match_info.get("agent"),
                query=request.query,
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

    def _check_content_type(self) -> None:
        """A metered body is JSON. A web page can send text/plain, form and multipart
        bodies to any origin without asking first: those never pass."""
        kind = self.request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind and (kind in _BROWSER_TYPES or not (kind in _JSON_TYPES or kind.endswith("+json"))):
            raise ProxyFault(
                415, "unsupported_media_type",
                f"meterproxy: this endpoint takes a JSON body (Content-Type:"
                f" application/json), not {kind}",
            )  # fmt: skip

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
        warned = self.svc.warned_models
        if model not in warned and len(warned) < 10_000:
            warned.add(model)
            log.warning("model %r has no price in %s: its calls are recorded as unpriced",
                        model, config.pricing_path)  # fmt: skip
        self.record.cost_pico = None

    def _upstream(self) -> Upstream:
        assert self.route is not None
        provider = self.route.shape.name
        upstream = self.svc.config.upstream_for(self.record.model_requested, provider)
        if upstream is None:
            raise ProxyFault(
                502, "no_upstream",
                f"meterproxy: no upstream speaks the {provider} API; add one to the config"
                f" (upstreams: [{{name: ..., provider: {provider}, base_url: ...}}])",
            )  # fmt: skip
        return upstream

    # -- admission --------------------------------------------------------------------

    async def _admit(self, raw_body: bytes | None) -> None:
        svc, rec = self.svc, self.record
        enforcer = svc.enforcer
        amount = 0
        if self.price is not None and self.body is not None and enforcer.needs_estimate(rec.agent):
            assert self.route is not None
            self.prompt = self.route.shape.prompt(self.route.endpoint, self.body)
            self.reservation = await reserve(self, svc.config)
            amount = self.reservation.amount
        digest = None
        if enforcer.loop_guard_applies(rec.agent):
            assert self.route is not None
            source = raw_body if raw_body is not None else self.route.path.encode()
            digest = hashlib.blake2b(source, digest_size=16).digest()
        admitted = await enforcer.admit(rec.agent, rec.intent, amount, svc.clock(), digest,
                                        call_id=rec.id)  # fmt: skip
        if isinstance(admitted, Refusal):
            raise budget_fault(admitted)
        self.ticket = admitted
        self.phase = Phase.ADMITTED
        rec.reserved_pico = amount

    # -- forwarding -------------------------------------------------------------------

    async def _forward(
        self, raw_body: bytes | None, metered: bool, strip_usage: bool
    ) -> web.StreamResponse:
        svc, request, rec = self.svc, self.request, self.record
        config = svc.config
        assert self.route is not None and self.upstream is not None
        r, upstream = self.route, self.upstream
        headers = request_headers(
            request.headers,
            upstream,
            r.shape,
            drop=(config.agent_header, config.intent_header),
            replace_credentials=bool(svc.keys),
            identity_encoding=metered,
        )
        data: Any = raw_body
        if raw_body is None and request.body_exists:
            data = request.content  # unmetered uploads stream through, never buffered
        rec.llm_calls = 1 if r.endpoint.metered or r.endpoint.kind.value == "unpriced" else 0
        query = _query(request, bool(svc.keys))
        url = r.shape.upstream_url(upstream.base_url, r.prefix, r.upstream_path, query)
        self.phase = Phase.FORWARDED
        self.timings.sent = time.perf_counter()
        try:
            response = await svc.client().request(
                request.method,
                url,
                headers=headers,
                data=data,
                timeout=client_timeout(config.timeouts, rec.stream),
                allow_redirects=False,
            )
        except Exception as e:
            failure = classify(e, Stage.CONNECT)
            if failure is None:
                raise
            self.maybe_billed = failure.maybe_billed
            raise failure.fault(upstream.name) from None
        self.timings.head = time.perf_counter()
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                rec.stream = True
                return await relay.stream(self, response, strip_usage)
            if metered:
                return await relay.json(self, response)
            return await relay.raw(self, response)
        finally:
            response.release()

    def upstream_fault(self, exc: BaseException) -> ProxyFault | None:
        failure = classify(exc, Stage.BODY)
        if failure is None:
            return None
        self.maybe_billed = failure.maybe_billed
        return failure.fault(self.record.upstream)

    # -- metering and recording -------------------------------------------------------

    async def estimate(self, texts: list[str], overflow_chars: int = 0) -> Usage:
        """Usage from tiktoken when the provider sent none: never 0 for unknown tokens."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = await tokens.count_prompt_async(model, self.prompt_of()) if self.body else 0
        # Deltas are joined first: a word split over two chunks is one token, not two.
        joined = ["".join(texts)] if texts else []
        output = await tokens.count_texts_async(model, joined) + -(-overflow_chars // 4)
        return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)

    def prompt_of(self) -> Prompt:
        if self.prompt is None:
            assert self.route is not None and self.body is not None
            self.prompt = self.route.shape.prompt(self.route.endpoint, self.body)
        return self.prompt

    def _estimate_now(self) -> Usage:
        """The estimate for a cancelled call: synchronous (no await is possible any more),
        so big texts are estimated at 4 characters a token instead of being tokenized."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = output = 0
        if self.body:
            p = self.prompt_of()
            prompt = (
                tokens.count(model, p.texts) + p.fixed_tokens
                if p.chars <= _SYNC_ESTIMATE_CHARS
                else p.chars // 4 + p.fixed_tokens
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

    def price_usage(self, usage: Usage | None) -> None:
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
            self.record.reserved_pico = self.ticket.amount

    def _finish_row(self) -> None:
        rec, t = self.record, self.timings
        now = time.perf_counter()
        rec.ended_at = self.svc.clock()
        rec.latency_ms = round((now - t.start) * 1000, 3)
        if t.head is not None:  # time to the upstream's first byte, on every path
            rec.ttfb_ms = round((t.head - t.start) * 1000, 3)
        if t.done is None and t.sent is not None:
            t.done = now

    async def commit(self) -> None:
        self._finish_row()
        self.phase = Phase.RECORDED
        await self.svc.ledger.commit(self.record)
        self._observe()

    def _observe(self) -> None:
        forwarded = self.timings.sent is not None
        self.svc.after_call(self.record, self.timings.upstream_seconds, forwarded)

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
            if self.timings.sent is not None and self.price is not None:
                self.price_usage(self._estimate_now())
            else:
                self.price_usage(None)
        self._finish_row()
        self.phase = Phase.RECORDED
        self.svc.ledger.submit(rec)
        self._observe()

    async def answer_fault(self, fault: ProxyFault) -> web.StreamResponse:
        rec = self.record
        rec.status = fault.status
        rec.error = f"{fault.code}: {fault.message}"
        rec.refused = fault.type in (BUDGET_ERROR, UNAVAILABLE_ERROR)
        if self.ticket is not None and not self.ticket.settled:
            # Nothing reached the provider, or it did and never answered: then estimate.
            self.price_usage(await self.estimate([]) if self.maybe_billed and self.price else None)
        elif rec.cost_pico is not None:
            rec.cost_pico = 0
        await self.commit()
        headers = {**fault.headers, "x-meter-request-id": rec.id}
        shape = self.route.shape if self.route is not None else None
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


# -- helpers ------------------------------------------------------------------------------


def _parse_json(raw: bytes) -> JSONObj:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProxyFault(
            400, "invalid_json", f"meterproxy: the request body is not valid JSON ({e})"
        ) from None
    if not isinstance(body, dict):
        raise ProxyFault(400, "invalid_json", "meterproxy: the request body must be a JSON object")
    return body


def _model_of(body: JSONObj, from_path: str | None) -> str:
    model = from_path if from_path is not None else body.get("model")
    if model is None:
        raise ProxyFault(
            400, "missing_model", "meterproxy: the request has no 'model'", param="model"
        )
    if not isinstance(model, str):
        raise ProxyFault(
            400, "invalid_model",
            f"meterproxy: 'model' must be a non-empty string, got {type(model).__name__}",
            param="model",
        )  # fmt: skip
    if not model.strip() or len(model) > 256 or not model.isprintable():
        raise ProxyFault(
            400,
            "invalid_model",
            "meterproxy: 'model' must be a non-empty string of printable characters,"
            " at most 256 long",
            param="model",
        )
    return model


def _query(request: web.Request, proxy_keys: bool) -> str:
    """The query string as sent; a proxy key in `?key=` (Gemini) never goes upstream."""
    if not proxy_keys or "key" not in request.query:
        return request.query_string
    from urllib.parse import urlencode

    return urlencode([(k, v) for k, v in request.query.items() if k != "key"])


def budget_fault(refusal: Refusal) -> ProxyFault:
    type_ = BUDGET_ERROR if refusal.status == 429 else UNAVAILABLE_ERROR
    return ProxyFault(
        refusal.status, refusal.code, refusal.message, type_=type_, headers=refusal.headers()
    )
