"""What a call costs: the price of its model, its usage priced (or estimated when the
provider sent none), and its budget reservation settled by that cost, exactly once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.errors import ProxyFault
from proxy.shapes.base import Kind, Prompt
from proxy.usage import ESTIMATED, Usage

if TYPE_CHECKING:
    from proxy.call import Call

log = logging.getLogger("meterproxy.proxy")
_SYNC_ESTIMATE_CHARS = 65_536


def resolve_price(call: Call) -> None:
    """The price of the model asked for: an Azure deployment as the model the
    upstream's `deployments:` names for it, else as a model of its own name."""
    assert call.upstream is not None
    rec = call.record
    model = rec.model_requested
    if model is None:
        return
    mapped = call.upstream.deployment_model(model) if call.upstream.deployments else None
    call.price = call.svc.prices.resolve(mapped or model)
    rec.price_version = call.svc.prices.version
    if call.price is None:
        _unknown_model(call, model)
    else:
        rec.model_priced = call.price.name


def reprice(call: Call, served: str | None) -> None:
    """A model the proxy could not price by what was asked (an Azure deployment with
    no map): priced by the model the response names, when the table has it."""
    if call.price is not None or served is None or not call.metered:
        return
    call.price = call.svc.prices.resolve(served)
    if call.price is not None:
        call.record.model_priced = call.price.name
        if call.record.cost_pico is None:
            call.record.cost_pico = 0


def _unknown_model(call: Call, model: str) -> None:
    config = call.svc.config
    if config.unknown_model == "block":
        raise ProxyFault(
            400, "unknown_model",
            f"meterproxy: model '{model}' has no price in {config.pricing_path};"
            " add it there (or set pricing.unknown_model: allow) and retry",
            param="model",
        )  # fmt: skip
    warned = call.svc.warned_models
    if model not in warned and len(warned) < 10_000:
        warned.add(model)
        log.warning("model %r has no price in %s: its calls are recorded as unpriced",
                    model, config.pricing_path)  # fmt: skip
    call.record.cost_pico = None


def unpriced_reason(call: Call) -> str | None:
    assert call.route is not None
    ep = call.route.endpoint
    if call.request.method == "POST" and ep.kind is Kind.UNPRICED:
        return f"POST /{call.route.path} bills in a way the request cannot show"
    if call.metered and call.price is None:
        return (f"model '{call.record.model_requested}' has no price in"
                f" {call.svc.config.pricing_path}")  # fmt: skip
    return None


def prompt_of(call: Call) -> Prompt:
    if call.prompt is None:
        assert call.route is not None
        call.prompt = (
            call.route.shape.prompt(call.route.endpoint, call.body)
            if call.body is not None
            else Prompt()
        )
    return call.prompt


async def estimate(call: Call, texts: list[str], overflow_chars: int = 0) -> Usage:
    """Usage from tiktoken when the provider sent none: never 0 for unknown tokens."""
    tokens, model = call.svc.tokens, call.record.model_requested
    prompt = (
        await tokens.count_prompt_async(model, prompt_of(call))
        if call.body is not None or call.prompt is not None
        else 0
    )
    # Deltas are joined first: a word split over two chunks is one token, not two.
    joined = ["".join(texts)] if texts else []
    output = await tokens.count_texts_async(model, joined) + -(-overflow_chars // 4)
    return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)


def estimate_now(call: Call) -> Usage:
    """The estimate for a cancelled call: synchronous (no await is possible any more),
    so big texts are estimated at 4 characters a token instead of being tokenized."""
    tokens, model = call.svc.tokens, call.record.model_requested
    prompt = output = 0
    if call.body is not None or call.prompt is not None:
        p = prompt_of(call)
        prompt = (
            tokens.count(model, p.texts) + p.fixed_tokens
            if p.chars <= _SYNC_ESTIMATE_CHARS
            else p.chars // 4 + p.fixed_tokens
        )
    if call.meter is not None:
        generated = "".join(call.meter.generated_texts())
        chars = len(generated) + call.meter.overflow_chars
        output = (
            tokens.count(model, [generated]) + -(-call.meter.overflow_chars // 4)
            if chars <= _SYNC_ESTIMATE_CHARS
            else -(-chars // 4)
        )
    return Usage(input_tokens=max(prompt, 1), output_tokens=output, source=ESTIMATED)


def price_usage(call: Call, usage: Usage | None, units: int | None = None) -> None:
    """Set tokens and cost on the row and settle the reservation. `units`: images,
    characters or seconds, for what is priced per unit."""
    rec = call.record
    if usage is None and units is None:
        rec.cost_pico = 0
    elif call.price is None:
        if usage is not None:
            rec.set_usage(usage)
        rec.cost_pico = None
    else:
        cost = 0
        if usage is not None:
            rec.set_usage(usage)
            cost = call.price.cost(usage)
        if units is not None:
            assert call.route is not None
            unit = call.price.unit_cost(call.route.endpoint.kind.value, units, call.facts.size)
            if unit is None and usage is None:
                rec.cost_pico = None
                _settle(call)
                return
            cost += unit or 0
        rec.cost_pico = cost
    _settle(call)


def _settle(call: Call) -> None:
    if call.ticket is not None:
        call.svc.enforcer.settle(call.ticket, call.record.cost_pico, call.svc.clock())
        call.record.reserved_pico = call.ticket.amount  # a stream budget's extensions included


async def settle_unanswered(call: Call) -> None:
    """Settle a call that gets no answer from the upstream: nothing reached the provider
    (cost 0), or it did and never answered (estimated: it may have billed)."""
    if call.ticket is not None and not call.ticket.settled:
        price_usage(call, await estimate(call, []) if call.maybe_billed and call.price else None)
