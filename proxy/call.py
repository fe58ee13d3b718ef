"""The metered call's life cycle: route, attribute, admit, forward, relay, settle, record.

Every request under an API prefix becomes one `Call`. Whatever happens (client error,
refusal, upstream fault, client gone, cancellation) it ends with exactly one ledger row,
and its budget reservation is settled exactly once. What an API shape means (paths,
usage, errors) is `proxy.shapes`; reading the request, `proxy.intake`; the upstream
exchange and a client that leaves first, `proxy.exchange`; how bytes come
back, `proxy.relay`; what is reserved, `proxy.reservation`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy import exchange, intake, relay, relay_stream
from proxy.attribution import UNAUTHENTICATED, end_user, identify, parse_tags
from proxy.background import Pending, completion_id
from proxy.config import Upstream
from proxy.counters import Ticket
from proxy.enforcer import Refusal
from proxy.errors import BUDGET_ERROR, UNAVAILABLE_ERROR, ProxyFault
from proxy.faults import Stage, classify
from proxy.http1 import Response
from proxy.outcomes import HEADER as OUTCOME_HEADER
from proxy.outcomes import OUTCOMES, parse_outcome
from proxy.paths import raw_tail
from proxy.pricing import ModelPrice
from proxy.records import new_record
from proxy.reservation import Reservation, reserve
from proxy.routing import Route, route
from proxy.services import Services
from proxy.shapes.base import BodyFacts, JSONObj, Kind, Prompt, RequestFacts
from proxy.shapes.openai import RETRIEVE, response_id_of
from proxy.sse import StreamMeter
from proxy.stream_budget import StreamBudget
from proxy.upstream import request_headers
from proxy.usage import ESTIMATED, PROVIDER, Usage

log = logging.getLogger("meterproxy.proxy")
_SYNC_ESTIMATE_CHARS = 65_536
PENDING = "pending"  # usage_source of a background response's create call


class Phase(enum.IntEnum):
    RECEIVED = 0  # being read and checked
    ADMITTED = 1  # a budget reservation is held
    FORWARDED = 2  # the request went to the upstream (or is on its way)
    RECORDED = 3  # its ledger row is submitted


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
        self.outcome: str | None = None  # X-Intent-Outcome: this call closes its intent
        self.reservation: Reservation | None = None
        self.stream_budget: StreamBudget | None = None
        self.meter: StreamMeter | None = None
        self.body: JSONObj | None = None
        self.facts = RequestFacts()
        self.prompt: Prompt | None = None
        self.price: ModelPrice | None = None
        self.metered = False
        self.unpriced = False  # bills in a way the proxy cannot price
        self.maybe_billed = False  # forwarded, then no answer: tokens unknown, not zero
        self.client_gone = False  # the client left; the upstream's answer is still metered
        self.response: web.StreamResponse | None = None
        self.awaited: Response | None = None  # the upstream's answer, finished if we leave
        self._credentials: dict[str, str] = {}

    @property
    def recorded(self) -> bool:
        """Its ledger row is submitted: nothing may record it again."""
        return self.phase >= Phase.RECORDED

    @property
    def prepared(self) -> bool:
        """Response headers went out: no error response is possible any more."""
        return self.response is not None and self.response.prepared

    # -- the whole call ---------------------------------------------------------------

    async def run(self) -> web.StreamResponse:
        detached = False
        try:
            return await self._run()
        except ProxyFault as fault:
            return await self.answer_fault(fault)
        except asyncio.CancelledError:
            detached = exchange.detach(self)
            raise
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
            if not self.recorded and not detached:
                # Cancelled (shutdown past its grace) or a bug: still one row, still settled.
                self.record_abnormal()

    async def _run(self) -> web.StreamResponse:
        _svc, request, rec = self.svc, self.request, self.record
        self.route = r = route(self.prefix, raw_tail(request.rel_url.raw_path, self.prefix),
                               request.method, request.headers)  # fmt: skip
        ep = r.endpoint
        rec.endpoint = ep.name if ep.metered else r.path
        self._identify()
        self.metered = request.method == "POST" and ep.metered and ep.body in ("json", "multipart")
        raw_body: bytes | None = None
        if self.metered:
            raw_body = await self._read_request()
        self._end_user()
        self.upstream = upstream = self._upstream()
        rec.upstream, rec.provider = upstream.name, upstream.provider
        if self.metered:
            self._resolve_price()
        await self._admit(raw_body)
        strip_usage = False
        if self.body is not None:
            body = self.body
            if rec.stream and upstream.inject_usage:
                patched = r.shape.ask_for_usage(ep, body)
                if patched is not None:
                    body, strip_usage = patched, True
            if self.reservation is not None and self.reservation.cap is not None:
                body = r.shape.set_cap(ep, body, self.reservation.cap)
            if body is not self.body:
                raw_body = orjson.dumps(body)
        return await self._forward(raw_body, strip_usage)

    async def _read_request(self) -> bytes:
        assert self.route is not None
        r, rec, request = self.route, self.record, self.request
        if r.endpoint.body == "json":
            intake.check_json_type(request)
        raw = await intake.read_body(request, self.svc.config)
        if r.endpoint.body == "json":
            self.body = body = intake.parse_json(raw)
            self.facts = r.shape.request(r.endpoint, body)
            model = intake.model_of(body.get("model"), r.endpoint.model)
        else:
            form = await intake.parse_form(request, raw)
            self.facts, self.prompt = r.shape.form_request(r.endpoint, form)
            model = intake.model_of(self.facts.model, r.endpoint.model)
        rec.model_requested = model
        rec.stream = self.facts.stream or r.endpoint.stream
        return raw

    def _resolve_price(self) -> None:
        """The price of the model asked for: an Azure deployment as the model the
        upstream's `deployments:` names for it, else as a model of its own name."""
        assert self.upstream is not None
        rec = self.record
        model = rec.model_requested
        if model is None:
            return
        mapped = self.upstream.deployment_model(model) if self.upstream.deployments else None
        self.price = self.svc.prices.resolve(mapped or model)
        rec.price_version = self.svc.prices.version
        if self.price is None:
            self._unknown_model(model)
        else:
            rec.model_priced = self.price.name

    def reprice(self, served: str | None) -> None:
        """A model the proxy could not price by what was asked (an Azure deployment with
        no map): priced by the model the response names, when the table has it."""
        if self.price is not None or served is None or not self.metered:
            return
        self.price = self.svc.prices.resolve(served)
        if self.price is not None:
            self.record.model_priced = self.price.name
            if self.record.cost_pico is None:
                self.record.cost_pico = 0

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
        rec.tags = parse_tags(request.headers.get(config.tags_header), config.tags_header)
        outcome = request.headers.get(OUTCOME_HEADER)
        if outcome is not None:
            self.outcome = parse_outcome(outcome)
            if self.outcome is None or rec.intent is None:
                raise ProxyFault(
                    400, "invalid_outcome",
                    f"header {OUTCOME_HEADER}: {outcome[:40]!r} closes the call's intent with"
                    f" one of {', '.join(OUTCOMES)}, and needs {config.intent_header}"
                    " to name the intent",
                    param=OUTCOME_HEADER,
                )  # fmt: skip

    def _end_user(self) -> None:
        config = self.svc.config
        from_body = self.facts.end_user if config.user_from_body else None
        self.record.end_user = end_user(
            self.request.headers.get(config.user_header), config.user_header, from_body,
            hash_users=config.hash_users, salt=config.user_hash_salt,
        )  # fmt: skip

    def _unknown_model(self, model: str) -> None:
        config = self.svc.config
        if config.unknown_model == "block":
            raise ProxyFault(
                400, "unknown_model",
                f"meterproxy: model '{model}' has no price in {config.pricing_path};"
                " add it there (or set pricing.unknown_model: allow) and retry",
                param="model",
            )  # fmt: skip
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

    def _unpriced_reason(self) -> str | None:
        assert self.route is not None
        ep = self.route.endpoint
        if self.request.method == "POST" and ep.kind is Kind.UNPRICED:
            return f"POST /{self.route.path} bills in a way the request cannot show"
        if self.metered and self.price is None:
            return (f"model '{self.record.model_requested}' has no price in"
                    f" {self.svc.config.pricing_path}")  # fmt: skip
        return None

    async def _admit(self, raw_body: bytes | None) -> None:
        svc, rec = self.svc, self.record
        enforcer = svc.enforcer
        reason = self._unpriced_reason()
        if reason is not None:
            self.unpriced = True
            if svc.config.unpriced == "block" and enforcer.plan(rec.agent, rec.end_user).refuses:
                raise ProxyFault(
                    403, "unpriced_call",
                    f"meterproxy: agent '{rec.agent}' is under a block budget and this call"
                    f" cannot be priced before it runs: {reason}. It is refused rather than"
                    " let through at an unknown cost; set budgets.unpriced: allow to let such"
                    " calls through (recorded as unpriced)",
                    type_=BUDGET_ERROR,
                )  # fmt: skip
        amount = 0
        if (
            self.price is not None
            and self.metered
            and enforcer.needs_estimate(rec.agent, rec.end_user)
        ):
            self.reservation = await reserve(self)
            amount = self.reservation.amount
        digest = None
        if enforcer.loop_guard_applies(rec.agent):
            assert self.route is not None
            source = raw_body if raw_body is not None else self.route.path.encode()
            digest = hashlib.blake2b(source, digest_size=16).digest()
        assert self.route is not None
        free = self.route.endpoint.kind is Kind.FREE
        floor = None
        if self.reservation is not None and svc.config.on_uncapped == "clamp":
            floor = self.reservation.input_cost + self.reservation.output_rate
        admitted = await enforcer.admit(rec.agent, rec.intent, amount, svc.clock(), digest,
                                        call_id=rec.id, free=free, user=rec.end_user,
                                        floor=floor)  # fmt: skip
        if isinstance(admitted, Refusal):
            raise budget_fault(admitted)
        self.ticket = admitted
        rec.shadow_limit = admitted.shadow
        self.phase = Phase.ADMITTED
        rec.reserved_pico = amount
        res = self.reservation
        if res is not None and res.slice_tokens is not None and amount:
            self.stream_budget = StreamBudget(
                enforcer, admitted, svc.tokens, rec.model_requested, res.input_cost,
                res.output_rate, res.slice_tokens, svc.clock,
            )  # fmt: skip

    # -- forwarding -------------------------------------------------------------------

    async def _forward(self, raw_body: bytes | None, strip_usage: bool) -> web.StreamResponse:
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
            identity_encoding=self.metered,
        )
        if self.facts.background:  # the proxy may retrieve the result itself
            self._credentials = {k: v for k, v in headers.items()
                                 if k.lower() in r.shape.credential_headers}  # fmt: skip
        data: Any = raw_body
        if raw_body is None and request.body_exists:
            data = request.content.iter_any()  # unmetered uploads stream, never buffered
        rec.llm_calls = 1 if r.endpoint.metered or r.endpoint.kind is Kind.UNPRICED else 0
        url = r.shape.upstream_url(upstream.base_url, r.prefix, r.upstream_path,
                                   _query(request, bool(svc.keys)))  # fmt: skip
        self.phase = Phase.FORWARDED
        self.timings.sent = time.perf_counter()
        response, body = await exchange.run(self, url, headers, data)
        try:
            if "text/event-stream" in response.headers.get("Content-Type", ""):
                rec.stream = True
                return await relay_stream.stream(self, response, strip_usage)
            if body is not None:
                return await relay.json(self, response, body)
            if r.endpoint.name == RETRIEVE and response.status == 200:
                return await relay.retrieved(self, response)
            return await relay.raw(self, response)
        finally:
            response.release()

    def upstream_fault(self, exc: BaseException, stage: Stage = Stage.BODY) -> ProxyFault | None:
        """The fault to answer for an upstream failure at `stage` (None: not one), and
        whether the provider may have billed for it."""
        failure = classify(exc, stage)
        if failure is None:
            return None
        self.maybe_billed = failure.maybe_billed
        return failure.fault(self.record.upstream)

    # -- what the answer says ------------------------------------------------------------

    async def absorb(self, facts: BodyFacts) -> bool:
        """Learn from a successful answer: the response's id, how long answers run, how
        long a chain is now. False when the usage is yet to come (a background response
        queued): the reservation stays until it finishes."""
        rec, svc = self.record, self.svc
        rec.response_id = facts.response_id or rec.response_id
        usage = facts.usage
        if self.facts.background and facts.status in ("queued", "in_progress") and usage is None:
            await self._await_background(facts)
            return False
        if usage is not None and usage.source == PROVIDER and self.price is not None:
            svc.history.record(
                rec.agent, self.price.name, usage.output_tokens // self.facts.choices
            )
            context = usage.input_tokens + usage.output_tokens
            if facts.response_id is not None:
                svc.chains.record(facts.response_id, context)
            if self.facts.conversation is not None:
                svc.chains.record(f"conversation:{self.facts.conversation}", context)
        return True

    async def _await_background(self, facts: BodyFacts) -> None:
        rec = self.record
        rec.usage_source, rec.cost_pico = PENDING, 0
        assert self.route is not None and self.upstream is not None
        if facts.response_id is None:
            return
        path = f"responses/{facts.response_id}"
        url = self.route.shape.upstream_url(self.upstream.base_url, self.route.prefix, path, "")
        pending = Pending(facts.response_id, rec.agent, rec.intent, rec.model_requested,
                          rec.upstream, rec.provider, self.price, self.ticket, url,
                          self._credentials)  # fmt: skip
        self.svc.background.add(pending)
        if self.ticket is not None:
            rec.reserved_pico = self.ticket.amount
            # This row's commit releases the reservation it names (shared budgets): the
            # completion row's id takes it over.
            await self.svc.enforcer.transfer(self.ticket, completion_id(facts.response_id))
        self.ticket = None  # the background book settles it

    async def observed(self, facts: BodyFacts) -> None:
        """A retrieval (GET responses/{id}, or its stream) that may finish a background
        response: its cost is recorded in a row of its own."""
        assert self.route is not None
        rid = facts.response_id or response_id_of(self.route.path)
        await self.svc.background.observed(rid, facts)

    # -- metering and recording -------------------------------------------------------

    async def estimate(self, texts: list[str], overflow_chars: int = 0) -> Usage:
        """Usage from tiktoken when the provider sent none: never 0 for unknown tokens."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = (
            await tokens.count_prompt_async(model, self.prompt_of())
            if self.body is not None or self.prompt is not None
            else 0
        )
        # Deltas are joined first: a word split over two chunks is one token, not two.
        joined = ["".join(texts)] if texts else []
        output = await tokens.count_texts_async(model, joined) + -(-overflow_chars // 4)
        return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)

    def prompt_of(self) -> Prompt:
        if self.prompt is None:
            assert self.route is not None
            self.prompt = (
                self.route.shape.prompt(self.route.endpoint, self.body)
                if self.body is not None
                else Prompt()
            )
        return self.prompt

    def _estimate_now(self) -> Usage:
        """The estimate for a cancelled call: synchronous (no await is possible any more),
        so big texts are estimated at 4 characters a token instead of being tokenized."""
        tokens, model = self.svc.tokens, self.record.model_requested
        prompt = output = 0
        if self.body is not None or self.prompt is not None:
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

    def price_usage(self, usage: Usage | None, units: int | None = None) -> None:
        """Set tokens and cost on the row and settle the reservation. `units`: images,
        characters or seconds, for what is priced per unit."""
        rec = self.record
        if usage is None and units is None:
            rec.cost_pico = 0
        elif self.price is None:
            if usage is not None:
                rec.set_usage(usage)
            rec.cost_pico = None
        else:
            cost = 0
            if usage is not None:
                rec.set_usage(usage)
                cost = self.price.cost(usage)
            if units is not None:
                assert self.route is not None
                unit = self.price.unit_cost(self.route.endpoint.kind.value, units, self.facts.size)
                if unit is None and usage is None:
                    rec.cost_pico = None
                    self._settle()
                    return
                cost += unit or 0
            rec.cost_pico = cost
        self._settle()

    def _settle(self) -> None:
        if self.stream_budget is not None and self.ticket is not None:
            self.record.reserved_pico = self.ticket.amount  # extensions included
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
        try:
            await self.svc.ledger.commit(self.record)
        finally:
            # The log line and the observers describe a finished call, so they wait for
            # the next turn of the loop: the caller writes the answer (or its last bytes)
            # in this one, and the client does not wait for them (70 us a call after an
            # idle gap). A client that hangs up meanwhile cancels the wait, not the row
            # (the ledger holds it): its line and its metrics still follow.
            asyncio.get_running_loop().call_soon(self._observe_after)

    def _observe_after(self) -> None:
        try:
            self._observe()
        except Exception:
            log.exception("observing call %s", self.record.id)

    def _observe(self) -> None:
        forwarded = self.timings.sent is not None
        rec = self.record
        headers = self.request.headers
        trace = None
        if "traceparent" in headers:
            trace = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
        self.svc.after_call(rec, self.timings.upstream_seconds, forwarded, trace)
        if self.outcome is not None and rec.intent is not None:
            closing = self.svc.close_intent(rec.agent, rec.intent, self.outcome, "header",
                                            rec.ended_at)  # fmt: skip
            self.svc.chore(closing, "recording an intent's outcome")

    def record_abnormal(self) -> None:
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


def _query(request: web.Request, proxy_keys: bool) -> str:
    """The query string as sent; a proxy key in `?key=` (Gemini) never goes upstream."""
    if not proxy_keys or "key" not in request.query:
        return request.rel_url.raw_query_string
    return urlencode([(k, v) for k, v in request.query.items() if k != "key"])


def budget_fault(refusal: Refusal) -> ProxyFault:
    type_ = BUDGET_ERROR if refusal.status == 429 else UNAVAILABLE_ERROR
    return ProxyFault(
        refusal.status, refusal.code, refusal.message, type_=type_, headers=refusal.headers()
    )
