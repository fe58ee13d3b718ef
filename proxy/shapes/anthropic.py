"""Anthropic's Messages API (`POST /v1/messages`), what `ANTHROPIC_BASE_URL` clients speak.

Usage: `input_tokens` counts only uncached input; cache writes
(`cache_creation_input_tokens`, split into 5-minute and 1-hour ones when given) and cache
reads (`cache_read_input_tokens`) come on top of it. In a stream, `message_start` carries
the input side and a provisional output count, and each `message_delta` carries usage so
far: cumulative, so the last one is taken, never a sum. `message_stop` ends the stream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson

from proxy.multipart import Form
from proxy.shapes.base import (
    BodyFacts,
    Endpoint,
    JSONObj,
    Kind,
    Marked,
    Prompt,
    RequestFacts,
    Verdict,
)
from proxy.shapes.openai import positive_int
from proxy.shapes.prompts import compact_json, media_of_base64
from proxy.usage import PROVIDER, InvalidUsage, Usage, count

_PER_MESSAGE = 4
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
    415: "invalid_request_error", 421: "invalid_request_error", 429: "rate_limit_error",
    503: "api_error", 504: "timeout_error",
}  # fmt: skip


@lru_cache(maxsize=1024)
def classify(tail: str, method: str) -> Endpoint:
    key = tail.lower()
    if method != "POST":
        return Endpoint(tail, Kind.FREE, "none")
    if key == "messages":
        return Endpoint("messages", Kind.TOKENS, "json")
    if key in ("messages/count_tokens", "files") or re.fullmatch(
        r"messages/batches/[^/]+/cancel", key
    ):
        return Endpoint(tail, Kind.FREE, "none")
    return Endpoint(tail, Kind.UNPRICED, "none")  # batches, the legacy `complete`...


def request_facts(body: JSONObj) -> RequestFacts:
    facts = RequestFacts(model=body.get("model") if isinstance(body.get("model"), str) else None)
    facts.stream = body.get("stream") is True
    facts.cap = positive_int(body.get("max_tokens"))  # required by the API; thinking included
    tier = body.get("service_tier")
    facts.service_tier = "default" if tier == "standard_only" else (
        tier if isinstance(tier, str) else None)  # fmt: skip
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        facts.end_user = metadata["user_id"] or None
    return facts


def prompt(body: JSONObj) -> Prompt:
    p = Prompt()
    system = body.get("system")
    if isinstance(system, str):
        p.texts.append(system)
    elif isinstance(system, list):
        _blocks(p, system)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            p.fixed_tokens += _PER_MESSAGE
            if isinstance(message, dict):
                content = message.get("content")
                if isinstance(content, str):
                    p.texts.append(content)
                elif isinstance(content, list):
                    _blocks(p, content)
    if body.get("tools"):
        p.texts.append(compact_json(body["tools"]))
    return p


def _blocks(p: Prompt, blocks: list[Any]) -> None:
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "thinking") or isinstance(block.get("text"), str):
            text = block.get("text") if kind != "thinking" else block.get("thinking")
            if isinstance(text, str):
                p.texts.append(text)
        elif kind in ("image", "document"):
            found = block.get("source")
            source: dict[str, Any] = found if isinstance(found, dict) else {}
            if source.get("type") == "base64":
                media = "image" if kind == "image" else "file"
                p.media.append(media_of_base64(media, source.get("media_type"), source.get("data")))
            elif source.get("type") == "text" and isinstance(source.get("data"), str):
                p.texts.append(source["data"])
            else:
                p.media.append(media_of_base64("image" if kind == "image" else "file", None, None))
        elif kind == "tool_use":
            p.texts.append(compact_json(block.get("input")))
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, str):
                p.texts.append(content)
            elif isinstance(content, list):
                _blocks(p, content)


def set_cap(body: JSONObj, tokens: int) -> JSONObj:
    patched = dict(body)
    current = positive_int(body.get("max_tokens"))
    patched["max_tokens"] = min(current, tokens) if current else tokens
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and positive_int(thinking.get("budget_tokens")):
        budget = int(thinking["budget_tokens"])
        if budget >= patched["max_tokens"]:  # the API wants budget_tokens < max_tokens
            patched["thinking"] = {**thinking, "budget_tokens": max(patched["max_tokens"] - 1, 1)}
    return patched


def parse_usage(raw: Any, service_tier: str | None = None) -> Usage:
    if not isinstance(raw, dict):
        raise InvalidUsage(f"usage is {type(raw).__name__}, not an object")
    if "input_tokens" not in raw and "output_tokens" not in raw:
        raise InvalidUsage("usage has neither input_tokens nor output_tokens")
    uncached = count(raw, "input_tokens")
    writes = count(raw, "cache_creation_input_tokens")
    reads = count(raw, "cache_read_input_tokens")
    split = raw.get("cache_creation")
    hour = count(split, "ephemeral_1h_input_tokens", "cache_creation: ") if split else 0
    tier = raw.get("service_tier") if isinstance(raw.get("service_tier"), str) else service_tier
    usage = Usage(
        input_tokens=uncached + writes + reads,
        cached_input_tokens=reads,
        output_tokens=count(raw, "output_tokens"),  # thinking included, as Anthropic bills it
        cache_write_tokens=writes,
        cache_write_1h_tokens=hour,
        service_tier=None if tier in (None, "standard") else tier,
        source=PROVIDER,
    )
    usage.check()
    return usage


def facts_from_body(obj: Any) -> BodyFacts:
    facts = BodyFacts()
    if not isinstance(obj, dict) or obj.get("type") == "error":
        return facts
    facts.model = obj["model"] if isinstance(obj.get("model"), str) else None
    facts.response_id = obj["id"] if isinstance(obj.get("id"), str) else None
    raw = obj.get("usage")
    if raw is not None:
        try:
            facts.usage = parse_usage(raw)
        except InvalidUsage as e:
            facts.usage_error = f"invalid provider usage: {e}"
    return facts


def output_texts(obj: Any) -> Iterator[str]:
    """Generated text in a message body or a stream event."""
    if not isinstance(obj, dict):
        return
    delta = obj.get("delta")
    if obj.get("type") == "content_block_delta" and isinstance(delta, dict):
        for key in ("text", "partial_json", "thinking"):
            if isinstance(delta.get(key), str):
                yield delta[key]
        return
    content = obj.get("content")
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    yield block[key]
            if block.get("type") == "tool_use":
                yield compact_json(block.get("input"))


class MessagesReader(Marked):
    markers = (b"message_start", b"message_delta", b"message_stop", b'"type":"error"')

    def __init__(self) -> None:
        self.facts = BodyFacts()
        self.model: str | None = None
        self.response_id: str | None = None
        self._usage: dict[str, Any] = {}

    def sniff_model(self, data: bytes) -> None:
        """Only `message_start` names the model: it is a marked event, parsed anyway."""

    def event(self, raw: bytes, obj: Any) -> Verdict:
        if not isinstance(obj, dict):
            return Verdict.SEND
        kind = obj.get("type")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            message = obj["message"]
            self.model = message.get("model") if isinstance(message.get("model"), str) else None
            self.response_id = message.get("id") if isinstance(message.get("id"), str) else None
            if isinstance(message.get("usage"), dict):
                self._usage = dict(message["usage"])
                self._update()
        elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
            self._usage.update(obj["usage"])  # cumulative: the latest values stand
            self._update()
        elif kind == "message_stop":
            return Verdict.FINAL
        return Verdict.SEND

    def _update(self) -> None:
        try:
            self.facts = BodyFacts(usage=parse_usage(self._usage), model=self.model,
                                   response_id=self.response_id)  # fmt: skip
        except InvalidUsage as e:
            self.facts = BodyFacts(usage_error=f"invalid provider usage: {e}", model=self.model)

    def texts(self, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def rewrite(self, data: bytes) -> bytes:
        return data

    def oversize(self, head: bytes, tail: bytes) -> Verdict:
        return Verdict.FINAL if b"message_stop" in head[:256] else Verdict.SEND


class AnthropicShape:
    name = "anthropic"
    credential_headers = frozenset({"x-api-key", "authorization"})

    def endpoint(self, tail: str, method: str) -> Endpoint | None:
        return classify(tail, method)

    def request(self, ep: Endpoint, body: JSONObj) -> RequestFacts:
        return request_facts(body)

    def prompt(self, ep: Endpoint, body: JSONObj) -> Prompt:
        return prompt(body)

    def form_request(self, ep: Endpoint, form: Form) -> tuple[RequestFacts, Prompt]:
        return RequestFacts(model=form.fields.get("model")), Prompt()

    def set_cap(self, ep: Endpoint, body: JSONObj, tokens: int) -> JSONObj:
        return set_cap(body, tokens)

    def ask_for_usage(self, ep: Endpoint, body: JSONObj) -> JSONObj | None:
        return None  # Anthropic streams always carry their usage

    def body_facts(self, ep: Endpoint, obj: Any) -> BodyFacts:
        return facts_from_body(obj)

    def output_texts(self, ep: Endpoint, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def stream_reader(self, ep: Endpoint, strip_usage: bool) -> MessagesReader:
        return MessagesReader()

    def error_body(self, status: int, type_: str, code: str, message: str,
                   param: str | None) -> bytes:  # fmt: skip
        """Anthropic's error shape, so its SDK raises the right class (RateLimitError...)."""
        kind = _ERROR_TYPES.get(status, "api_error")
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message,
                                                        "code": code}})  # fmt: skip

    def cut_event(self, ep: Endpoint, type_: str, code: str, message: str) -> bytes:
        error = {"type": "rate_limit_error", "message": message, "code": code}
        data = orjson.dumps({"type": "error", "error": error})
        return b"event: error\ndata: " + data + b"\n\n"

    def upstream_error_message(self, obj: Any) -> str | None:
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else None

    def upstream_url(self, base_url: str, prefix: str, path: str, query: str) -> str:
        """Anthropic's base URL is the API's root (`https://api.anthropic.com`)."""
        url = f"{base_url}/v1/{path}"
        return f"{url}?{query}" if query else url

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}
