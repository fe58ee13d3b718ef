"""Token usage: the `Usage` record and its extraction from provider bodies and SSE events.

Pure functions over parsed JSON; no I/O. Provider shapes handled: chat completions, legacy
completions, embeddings and the Responses API (incl. its streaming events).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from proxy.bounds import MAX_TOKENS

PROVIDER = "provider"
ESTIMATED = "estimated"
REPORTED = "reported"
NONE = "none"  # nothing was generated: refused, upstream error, unmetered endpoint


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # all input tokens, cached and cache-written ones included
    cached_input_tokens: int = 0
    output_tokens: int = 0  # all output tokens, reasoning ones included (as OpenAI counts)
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    service_tier: str | None = None
    source: str = NONE


class InvalidUsage(ValueError):
    """The provider sent a usage block that cannot be true (negative, not a number...)."""


def _count(obj: Any, key: str, where: str) -> int:
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUsage(f"{where}{key}={value!r} is not a whole number")
    if value < 0:
        raise InvalidUsage(f"{where}{key}={value} is negative")
    if value > MAX_TOKENS:
        raise InvalidUsage(f"{where}{key}={value} is more than {MAX_TOKENS:,} tokens")
    return value


def _first(obj: Any, *keys: str) -> str | None:
    for key in keys:
        if key in obj:
            return key
    return None


def parse_usage(raw: Any) -> Usage:
    """A provider `usage` object in any of the OpenAI shapes -> Usage(source=provider)."""
    if not isinstance(raw, dict):
        raise InvalidUsage(f"usage is {type(raw).__name__}, not an object")
    in_key = _first(raw, "prompt_tokens", "input_tokens")
    out_key = _first(raw, "completion_tokens", "output_tokens")
    if in_key is None and out_key is None:
        raise InvalidUsage("usage has neither prompt_tokens nor input_tokens")
    usage = Usage(source=PROVIDER)
    usage.input_tokens = _count(raw, in_key, "") if in_key else 0
    usage.output_tokens = _count(raw, out_key, "") if out_key else 0
    in_details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    out_details = raw.get("completion_tokens_details") or raw.get("output_tokens_details") or {}
    if isinstance(in_details, dict):
        usage.cached_input_tokens = _count(in_details, "cached_tokens", "input details: ")
        usage.cache_write_tokens = _count(in_details, "cache_creation_tokens", "input details: ")
    if isinstance(out_details, dict):
        usage.reasoning_tokens = _count(out_details, "reasoning_tokens", "output details: ")
    # Anthropic-style fields, as some OpenAI-compatible gateways pass them through.
    if not usage.cached_input_tokens:
        usage.cached_input_tokens = _count(raw, "cache_read_input_tokens", "")
    if not usage.cache_write_tokens:
        usage.cache_write_tokens = _count(raw, "cache_creation_input_tokens", "")
    if usage.cached_input_tokens + usage.cache_write_tokens > usage.input_tokens:
        raise InvalidUsage(
            f"cached ({usage.cached_input_tokens}) + cache-write ({usage.cache_write_tokens})"
            f" input tokens exceed input tokens ({usage.input_tokens})"
        )
    if usage.reasoning_tokens > usage.output_tokens:
        raise InvalidUsage(
            f"reasoning tokens ({usage.reasoning_tokens}) exceed output tokens"
            f" ({usage.output_tokens})"
        )
    return usage


@dataclass(slots=True)
class BodyFacts:
    """What a complete (non-streaming) response body or final stream event tells us."""

    usage: Usage | None = None
    usage_error: str | None = None
    model: str | None = None
    service_tier: str | None = None


def facts_from_body(obj: Any) -> BodyFacts:
    """Facts from a response object (chat/completions/embeddings/responses)."""
    facts = BodyFacts()
    if not isinstance(obj, dict):
        return facts
    if obj.get("object") == "response" or obj.get("type") in _RESPONSE_FINAL_EVENTS:
        obj = obj.get("response", obj)
        if not isinstance(obj, dict):
            return facts
    model = obj.get("model")
    facts.model = model if isinstance(model, str) else None
    tier = obj.get("service_tier")
    facts.service_tier = tier if isinstance(tier, str) else None
    raw = obj.get("usage")
    if raw is not None:
        try:
            facts.usage = parse_usage(raw)
            facts.usage.service_tier = facts.service_tier
        except InvalidUsage as e:
            facts.usage_error = f"invalid provider usage: {e}"
    return facts


_RESPONSE_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSE_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.refusal.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


def _message_texts(message: Any) -> Iterator[str]:
    if not isinstance(message, dict):
        return
    for key in ("content", "refusal", "reasoning_content", "text"):
        value = message.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for part in value:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                for key in ("name", "arguments"):
                    if isinstance(fn.get(key), str):
                        yield fn[key]


def output_texts(obj: Any) -> Iterator[str]:
    """Generated text in a response body or a stream chunk, for estimating output tokens."""
    if not isinstance(obj, dict):
        return
    event_type = obj.get("type")
    if isinstance(event_type, str) and event_type.startswith("response."):
        if event_type in _RESPONSE_TEXT_DELTAS and isinstance(obj.get("delta"), str):
            yield obj["delta"]
        return
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                yield choice["text"]
            yield from _message_texts(choice.get("message"))
            yield from _message_texts(choice.get("delta"))
        return
    output = obj.get("output")
    if obj.get("object") == "response" and isinstance(output, list):
        for item in output:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("arguments"), str):
                yield item["arguments"]
            content = item.get("content")
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part["text"]


def is_final_response_event(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("type") in _RESPONSE_FINAL_EVENTS
