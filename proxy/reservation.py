"""What a call reserves against its budgets before it goes out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config import Config

if TYPE_CHECKING:
    from proxy.call import Call


_PER_MEDIA = 1105  # a high-detail image tile set at its largest: an upper bound


@dataclass
class Reservation:
    amount: int  # pico-USD held at admission
    input_tokens: int  # an upper bound of what the provider will count as input
    output_tokens: int  # output tokens the amount covers
    cap: int | None = None  # the output cap set on the request (None: left as sent)


async def reserve(call: Call, config: Config) -> Reservation:
    """Prompt tokens (with a margin) x input price + output cap x output price, at the
    dearest tier the model has."""
    price, facts = call.price, call.facts
    assert price is not None and call.route is not None
    p = call.prompt_of()
    prompt = await call.svc.tokens.count_prompt_async(call.record.model_requested, p)
    prompt += _PER_MEDIA * len(p.media)
    margin = int(config.reserve_input_margin * 1_000_000)
    input_tokens = prompt + -(-prompt * margin // 1_000_000)
    cap = 0
    if call.route.endpoint.name != "embeddings":
        cap = facts.cap or price.max_output or config.reserve_output_tokens
        cap *= facts.choices
    return Reservation(price.worst_case(input_tokens, cap), input_tokens, cap)
