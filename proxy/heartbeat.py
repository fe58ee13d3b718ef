"""POST /meter/heartbeat: costs an agent reports for calls the proxy did not see.

The body is the shape agents' owners already send:
{"agent": "...", "intent_id": "...", "status": "...",
 "metrics": {"cost_usd": 0.03, "llm_calls": 4, "tokens_in": 2100, "tokens_out": 850}}
It is recorded with usage_source=reported, counts toward budgets, and the answer says
whether the agent may go on (200) or not (429), with what remains of each limit.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from proxy.attribution import presented_key
from proxy.bounds import MAX_REPORTED_CALLS, MAX_TOKENS
from proxy.budget_views import status as budget_status
from proxy.errors import BUDGET_ERROR, UNAVAILABLE_ERROR, ProxyFault
from proxy.ids import IdError, validate_id
from proxy.money import pico_to_usd, usd_exact, usd_to_pico
from proxy.outcomes import OUTCOMES
from proxy.records import CallRecord
from proxy.schema import MISSING, FieldError, Section
from proxy.services import SERVICES, Services
from proxy.usage import REPORTED

# running (or the product note's "processing"): still at it; progress: it moved forward
# (spend so far no longer counts toward max_cost_per_intent_without_progress_usd); an
# outcome closes the intent. Anything else is refused: a typo such as "sucess" must not
# leave an intent open without anyone noticing.
RUNNING = ("running", "processing")
STATUSES = (*RUNNING, "progress", *OUTCOMES)


def _parse(
    data: Any, svc: Services, key_agent: str | None
) -> tuple[str, str | None, dict[str, Any]]:
    body = Section(data)
    body.check_unknown(("agent", "intent_id", "status", "metrics"))
    agent = body.string("agent", None)
    if key_agent is not None:
        if agent is not None and agent != key_agent:
            body.fail("agent", f"does not match the proxy key's agent '{key_agent}'")
        agent = key_agent
    if agent is None:
        body.fail("agent", "is required")
    intent = body.string("intent_id", None)
    for name, value in (("agent", agent), ("intent_id", intent)):
        if value is not None:
            try:
                validate_id(value, name.split("_")[0])
            except IdError as e:
                body.fail(name, e.reason)
    status = body.string("status", None)
    if status is not None:
        status = status.strip().lower()
        if status not in STATUSES:
            body.fail("status", f"must be one of {', '.join(STATUSES)}")
        if status not in RUNNING and intent is None:
            body.fail("status", f"'{status}' is about an intent: intent_id is required")
    metrics = body.section("metrics")
    if not body.has("metrics") and status is None:
        body.fail("metrics", "is required (an object with cost_usd), unless status is given")
    metrics.check_unknown(("cost_usd", "llm_calls", "tokens_in", "tokens_out"))
    cap = pico_to_usd(svc.config.heartbeat_max_cost_pico)
    try:
        cost = metrics.usd("cost_usd", Decimal(0) if status is not None else MISSING, max=cap)
    except FieldError as e:
        if "at most" in e.reason:  # say which setting bounds it
            raise FieldError(e.key, e.value, f"{e.reason} per heartbeat (heartbeat.max_cost_usd)",
                             e.parts) from None  # fmt: skip
        raise
    values = {
        "status": status,
        "cost": usd_to_pico(cost),
        "llm_calls": metrics.integer("llm_calls", 0, min=0, max=MAX_REPORTED_CALLS),
        "tokens_in": metrics.integer("tokens_in", 0, min=0, max=MAX_TOKENS),
        "tokens_out": metrics.integer("tokens_out", 0, min=0, max=MAX_TOKENS),
    }
    return agent, intent, values


async def heartbeat(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    t0 = time.perf_counter()
    try:
        if not svc.config.heartbeats_on:
            raise ProxyFault(
                403, "heartbeats_disabled",
                f"meterproxy: heartbeats are off: this proxy listens on {svc.config.host}"
                " without proxy keys, so anyone who reaches it could report spend for any"
                " agent; configure keys, or set heartbeat.enabled: true",
            )  # fmt: skip
        key_agent = None
        if svc.keys:
            key = presented_key(request.headers)
            key_agent = svc.keys.agent_for(key) if key else None
            if key_agent is None:
                raise ProxyFault(
                    401, "invalid_api_key", "meterproxy: a heartbeat needs a valid proxy key"
                )
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise ProxyFault(
                400, "invalid_json", f"meterproxy: the body is not valid JSON ({e})"
            ) from None
        try:
            agent, intent, m = _parse(data, svc, key_agent)
        except FieldError as e:
            raise ProxyFault(
                400, "invalid_heartbeat", f"meterproxy: {e.describe()}", param=e.key
            ) from None
    except ProxyFault as fault:
        if svc.metrics is not None:
            svc.metrics.heartbeat(fault.code)
        return fault.response()
    if svc.metrics is not None:
        svc.metrics.heartbeat("recorded")

    now = svc.clock()
    enforcer = svc.enforcer
    await enforcer.add_reported(agent, intent, m["cost"], now)
    # The row first: with shared budgets its commit is what counts the spend, and the
    # answer must see it.
    record = CallRecord(
        id=svc.new_id(), started_at=now, ended_at=svc.clock(), agent=agent, intent=intent,
        upstream=None, endpoint="heartbeat", method="POST", model_requested=None,
        model_served=None, model_priced=None, status=200, stream=False,
        input_tokens=m["tokens_in"], cached_input_tokens=0, output_tokens=m["tokens_out"],
        reasoning_tokens=0, cache_write_tokens=0, cost_pico=m["cost"], usage_source=REPORTED,
        service_tier=None, price_version=None,
        latency_ms=round((time.perf_counter() - t0) * 1000, 3), ttfb_ms=None,
        error=None, llm_calls=m["llm_calls"], refused=False, reserved_pico=0,
    )  # fmt: skip
    await svc.ledger.commit(record)
    svc.after_call(record)
    status_ = m["status"]
    if intent is not None and status_ == "progress":
        await enforcer.record_progress(agent, intent, now)
    elif intent is not None and status_ in OUTCOMES:
        await svc.close_intent(agent, intent, status_, "heartbeat", now)
    refusal = await enforcer.standing(agent, intent, now)
    status = budget_status(enforcer, agent, now)
    answer: dict[str, Any] = {
        "allowed": refusal is None,
        "agent": agent,
        "intent_id": intent,
        "recorded_cost_usd": usd_exact(m["cost"]),
        "request_id": record.id,
        "state": status["state"],
        "limits": status["limits"],
    }
    headers = {"x-meter-request-id": record.id}
    if refusal is not None:
        type_ = BUDGET_ERROR if refusal.status == 429 else UNAVAILABLE_ERROR
        answer["error"] = {"message": refusal.message, "type": type_,
                           "code": refusal.code, "param": None}  # fmt: skip
        headers |= refusal.headers()
    return web.Response(
        status=refusal.status if refusal else 200,
        body=orjson.dumps(answer),
        content_type="application/json",
        headers=headers,
    )
