"""What a call reserves against its budgets before it goes out, and what it may generate.

The input side is an upper bound of what the provider will count: tiktoken's count of the
prompt plus a margin (larger for providers whose tokenizers count more), each image by the
model's own rule (`pricing.yaml` `images:`), audio and files at a bound from their size,
and the earlier turns of a Responses chain (`previous_response_id`, `conversation`) the
request does not show. All at the tier the request asks for, at the dearest input price
of that tier (every token written to a cache, say).

The output side is where agents differ from benchmarks: they rarely send `max_tokens`,
and a model's maximum (128,000 tokens) would refuse every call of a small budget. So:

- a stream reserves its *expected* output (the larger of `budgets.reserve_output_tokens`
  and the 95th percentile of this agent's recent answers from this model, within the
  request's cap) and, unless that covers its whole cap, is metered as it flows
  (`proxy.stream_budget`), extended slice by slice, cut when the budget cannot pay for
  the next slice;
- a non-streamed call (and a stream of a model that reasons in tokens a stream does not
  show) cannot be cut: under `budgets.on_uncapped: clamp` (the default) its output cap is
  set to what the budget affords, so the provider itself stops there; an uncapped call
  takes at most `clamp_share` of what remains, so calls in parallel still fit.
  `expected` reserves the expected size and accepts the overshoot; `reserve_max` reserves
  the cap and refuses what does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.call_cost import prompt_of
from proxy.errors import BUDGET_ERROR, ProxyFault
from proxy.images import DEFAULT_RULE, ImageRule
from proxy.pricing import ModelPrice, Rates
from proxy.shapes.base import Kind, Media

if TYPE_CHECKING:
    from proxy.call import Call

_PROVIDER_RULES = {
    "anthropic": ImageRule("pixels"),
    "google": ImageRule("gemini", tile=258),
}
_AUDIO_BYTES_PER_TOKEN = 200  # 10 tokens a second of audio at >= 16 kbit/s
_FILE_BYTES_PER_TOKEN = 3
_UNKNOWN_MEDIA_TOKENS = 128_000  # a remote file of unknown size, when the model says no more


@dataclass
class Reservation:
    amount: int  # pico-USD held at admission
    input_tokens: int  # an upper bound of what the provider will count as input
    input_cost: int
    output_rate: int  # pico-USD per output token at the reserved tier (the dearest kind)
    output_tokens: int  # output tokens the amount covers
    cap: int | None = None  # the output cap to set on the request (clamp), per choice
    slice_tokens: int | None = None  # a stream metered as it flows: its extension step
    tier: str | None = None


def resolve_tier(requested: str | None, upstream_default: str | None) -> str | None:
    """`auto` or no tier: the upstream's default (OpenAI projects can default to
    priority); `default`, `standard`: the base prices."""
    if requested in (None, "auto"):
        return upstream_default
    if requested in ("default", "standard", "standard_only"):
        return None
    return requested


def media_tokens(media: Media, price: ModelPrice) -> int:
    if media.kind == "image":
        rule = price.image_rule or _PROVIDER_RULES.get(price.provider, DEFAULT_RULE)
        return rule.tokens(media.width, media.height, media.detail)
    ceiling = price.context_window or _UNKNOWN_MEDIA_TOKENS
    if media.remote or media.size_bytes is None:
        return ceiling
    per = _AUDIO_BYTES_PER_TOKEN if media.kind == "audio" else _FILE_BYTES_PER_TOKEN
    return min(ceiling, -(-media.size_bytes // per))


async def _chain_tokens(call: Call, price: ModelPrice) -> int:
    """Earlier turns the request does not show, but the provider bills as input: for a
    call that continues a chain (`previous_response_id` or `conversation`; `reserve`
    awaits this only then)."""
    facts = call.facts
    chains = call.svc.chains
    known: int | None
    if facts.previous_response_id is not None:
        known = await chains.tokens(facts.previous_response_id)
        what = f"previous_response_id '{facts.previous_response_id}'"
    else:
        assert facts.conversation is not None
        known = chains.conversation(facts.conversation)
        what = f"conversation '{facts.conversation}'"
    if known is not None:
        return known
    config = call.svc.config
    if config.unknown_chain == "block" or price.context_window is None:
        raise ProxyFault(
            403, "unknown_chain",
            f"meterproxy: {what} continues a chain this proxy did not see, so its cost"
            " cannot be bounded" + (
                f" (model '{price.name}' has no context_window in {config.pricing_path})"
                if price.context_window is None else "")
            + "; start the chain through the proxy, or set budgets.unknown_chain:"
            " context_window to reserve the model's whole context",
            type_=BUDGET_ERROR,
        )  # fmt: skip
    return price.context_window


async def reserve(call: Call) -> Reservation:
    svc, price, facts = call.svc, call.price, call.facts
    assert price is not None and call.route is not None and call.upstream is not None
    config = svc.config
    ep = call.route.endpoint
    tier = resolve_tier(facts.service_tier, call.upstream.default_service_tier)
    if ep.kind is not Kind.TOKENS:
        return await _units(call, price, tier)
    prompt = prompt_of(call)
    model = call.record.model_requested
    text = svc.tokens.count_small_prompt(model, prompt)
    if text is None:
        text = await svc.tokens.count_prompt_async(model, prompt)
    margin = config.input_margin(call.upstream.provider)
    input_tokens = math.ceil(text * (1 + margin))
    if prompt.media:
        input_tokens += sum(media_tokens(m, price) for m in prompt.media)
    if facts.previous_response_id is not None or facts.conversation is not None:
        input_tokens += await _chain_tokens(call, price)
    rates = price.rates_for(tier, input_tokens)
    input_cost = input_tokens * rates.dearest_input
    if ep.name == "embeddings":
        return Reservation(input_cost, input_tokens, input_cost, 0, 0, tier=tier)
    rate = rates.dearest_output
    choices = facts.choices
    worst = (facts.cap or price.max_output or config.reserve_output_tokens) * choices
    loaded, recent = svc.history.expected_if_loaded(call.record.agent, price.name)
    if not loaded:
        recent = await svc.history.expected(call.record.agent, price.name)
    recent = recent or 0
    expected = min(max(config.reserve_output_tokens, recent) * choices, worst)
    if (facts.stream or ep.stream) and not price.hidden_reasoning:
        # Metered as it flows only if it can outgrow its reservation: a stream whose whole
        # cap is reserved cannot, so its events are not parsed one by one for their text.
        flowing = max(expected, 1) if expected < worst else None
        return Reservation(input_cost + expected * rate, input_tokens, input_cost, rate,
                           expected, slice_tokens=flowing, tier=tier)  # fmt: skip
    return _capped(call, rates, input_tokens, input_cost, rate, worst, expected, tier)


def _capped(
    call: Call, rates: Rates, input_tokens: int, input_cost: int, rate: int, worst: int,
    expected: int, tier: str | None,
) -> Reservation:  # fmt: skip
    """A call that cannot be cut once it runs: its whole output cap is reserved, the cap
    clamped to what the budget affords when it must be."""
    config, facts = call.svc.config, call.facts
    full = input_cost + worst * rate
    base = Reservation(full, input_tokens, input_cost, rate, worst, tier=tier)
    if config.on_uncapped == "reserve_max" or rate == 0:
        return base
    if config.on_uncapped == "expected":
        if facts.cap is not None:
            return base
        return Reservation(input_cost + expected * rate, input_tokens, input_cost, rate,
                           expected, tier=tier)  # fmt: skip
    rec = call.record
    headroom = call.svc.enforcer.headroom(rec.agent, rec.intent, call.svc.clock(), rec.end_user)
    if headroom is None:
        return base  # no limit refuses: nothing to clamp to
    if facts.cap is not None:
        if full <= headroom:
            return base  # the request's own cap fits: as the client asked
        allowance = headroom
    else:
        # An uncapped call takes at most a share of what remains (others run beside it),
        # and at least its expected size while the budget can pay for that.
        allowance = min(max(int(headroom * config.clamp_share), input_cost + expected * rate),
                        headroom)  # fmt: skip
        if full <= allowance:
            return base
    per_choice = (allowance - input_cost) // rate // facts.choices
    if per_choice < 1:
        return base  # nothing fits: admission refuses it, naming the limit
    output = per_choice * facts.choices
    return Reservation(input_cost + output * rate, input_tokens, input_cost, rate, output,
                       cap=per_choice, tier=tier)  # fmt: skip


# An input image of an edit, at most (gpt-image at high input fidelity, 1536 px).
_EDIT_IMAGE_TOKENS = 6_240


async def _units(call: Call, price: ModelPrice, tier: str | None) -> Reservation:
    """Images, speech and transcription: priced per unit, or by the tokens of the units
    asked for (gpt-image: OpenAI's output tokens per image of that size and quality)."""
    assert call.route is not None
    facts, kind = call.facts, call.route.endpoint.kind
    rates = price.rates_for(tier, 0)
    units = price.units
    prompt = await call.svc.tokens.count_prompt_async(call.record.model_requested, prompt_of(call))
    input_tokens = prompt + facts.input_images * _EDIT_IMAGE_TOKENS
    input_cost = input_tokens * rates.dearest_input
    amount = input_cost
    if kind is Kind.IMAGES:
        per_image, tokens = units.image(facts.size), units.image_tokens(facts.size)
        if per_image is not None:
            amount += per_image * facts.units
        elif tokens is not None:
            amount += tokens * facts.units * rates.dearest_output
    elif kind is Kind.SPEECH and units.per_char is not None:
        amount = units.per_char * facts.units
    elif kind is Kind.TRANSCRIPTION and units.per_minute is not None:
        amount += -(-units.per_minute * facts.units // 60)
    return Reservation(amount, input_tokens, input_cost, rates.dearest_output, 0, tier=tier)
