"""The metered call's life cycle: route, attribute, admit, forward, relay, settle, record.

Every request under an API prefix becomes one `Call`. Whatever happens (client error,
refusal, upstream fault, client gone, cancellation) it ends with exactly one ledger row,
and its budget reservation is settled exactly once. What an API shape means (paths,
usage, errors) is `proxy.shapes`; reading the request, `proxy.intake`; the upstream
exchange and a client that leaves first, `proxy.exchange`; how bytes come
back, `proxy.relay`; what is reserved, `proxy.reservation`; what the call costs and how
its reservation settles, `proxy.call_cost`; how it ends (its row, its observers, a fault
answered), `proxy.call_end`; its phase and timings, `proxy.call_state`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from proxy import exchange, intake, relay, relay_stream
from proxy.attribution import UNAUTHENTICATED, end_user, identify, parse_tags
from proxy.background import Pending, completion_id
from proxy.call_cost import resolve_price, unpriced_reason
from proxy.call_end import answer_fault, record_abnormal
from proxy.call_state import Phase, Timings
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
from proxy.usage import PROVIDER

log = logging.getLogger("meterproxy.proxy")
PENDING = "pending"  # usage_source of a background response's create call


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
            return await answer_fault(self, fault)
        except asyncio.CancelledError:
            detached = exchange.detach(self)
            raise
        except Exception as e:
            if self.prepared:
                raise  # bytes went out already: aiohttp can only close the connection
            log.exception("unexpected error in call %s", self.record.id)
            return await answer_fault(
                self,
                ProxyFault(
                    500,
                    "internal_error",
                    f"meterproxy: internal error ({type(e).__name__}); the call is recorded"
                    f" as {self.record.id}",
                ),
            )
        finally:
            if not self.recorded and not detached:
                # Cancelled (shutdown past its grace) or a bug: still one row, still settled.
                record_abnormal(self)

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
            resolve_price(self)
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
        reason = unpriced_reason(self)
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
