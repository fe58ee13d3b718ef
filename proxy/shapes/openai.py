"""The OpenAI API shape: chat completions, completions, embeddings, Responses, images and
audio, under `/v1/` (and Azure OpenAI's paths, `proxy.shapes.azure`, which reuse it)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any

import orjson

from proxy.multipart import Form, audio_seconds
from proxy.shapes.base import (
    BodyFacts,
    Endpoint,
    JSONObj,
    Kind,
    Marked,
    Media,
    Prompt,
    RequestFacts,
    Verdict,
)
from proxy.shapes.prompts import compact_json, media_of_url
from proxy.usage import PROVIDER, InvalidUsage, Usage, count

_PER_MESSAGE = 4  # role and separators, per OpenAI's counting guide
_PER_REQUEST = 3  # the primed assistant reply
CAP_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")

_TOKENS = {
    "chat/completions": "json",
    "completions": "json",
    "embeddings": "json",
    "responses": "json",
}
_OTHER = {
    "images/generations": (Kind.IMAGES, "json"),
    "images/edits": (Kind.IMAGES, "multipart"),
    "images/variations": (Kind.IMAGES, "multipart"),
    "audio/speech": (Kind.SPEECH, "json"),
    "audio/transcriptions": (Kind.TRANSCRIPTION, "multipart"),
    "audio/translations": (Kind.TRANSCRIPTION, "multipart"),
}
# POSTs that never bill: checks, uploads, cancellations, metadata. Anything else that is
# not metered bills in a way the request cannot show (batches, fine-tuning, assistants
# runs, realtime sessions, vector stores, containers...): unpriced.
_FREE_POSTS = (
    re.compile(r"moderations"),
    re.compile(r"files"),
    re.compile(r"uploads(/[^/]+/(parts|complete|cancel))?"),
    re.compile(r"responses/input_tokens"),
    re.compile(r"responses/[^/]+/cancel"),
    re.compile(r"chat/completions/[^/]+"),  # update a stored completion's metadata
    re.compile(r"conversations(/[^/]+(/items(/[^/]+)?)?)?"),
    re.compile(r"batches/[^/]+/cancel"),
    re.compile(r"fine_tuning/jobs/[^/]+/(cancel|pause|resume)"),
)
RETRIEVE = "responses/retrieve"  # GET responses/{id}: may carry a background response's usage
_RESPONSE_ID = re.compile(r"responses/([^/]+)")


@lru_cache(maxsize=4096)
def classify(tail: str, method: str) -> Endpoint:
    """What an OpenAI path is (`tail` canonical and after `/v1/`). Matching ignores case:
    an upstream that does too must not serve a metered path under another spelling."""
    key = tail.lower()
    if method == "POST":
        if key in _TOKENS:
            return Endpoint(key, Kind.TOKENS, _TOKENS[key])
        if key in _OTHER:
            kind, body = _OTHER[key]
            return Endpoint(key, kind, body)
        if any(p.fullmatch(key) for p in _FREE_POSTS):
            return Endpoint(tail, Kind.FREE, "none")
        return Endpoint(tail, Kind.UNPRICED, "none")
    if method == "GET" and _RESPONSE_ID.fullmatch(key):
        return Endpoint(RETRIEVE, Kind.FREE, "none")
    return Endpoint(tail, Kind.FREE, "none")


def response_id_of(tail: str) -> str | None:
    m = _RESPONSE_ID.fullmatch(tail)
    return m.group(1) if m else None


# -- requests -------------------------------------------------------------------------------


def positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def request_facts(ep: Endpoint, body: JSONObj) -> RequestFacts:
    facts = RequestFacts(model=body.get("model") if isinstance(body.get("model"), str) else None)
    facts.stream = body.get("stream") is True
    if ep.name != "embeddings":
        facts.cap = next((v for k in CAP_KEYS if (v := positive_int(body.get(k)))), None)
    facts.choices = max(positive_int(body.get("n")) or 1, positive_int(body.get("best_of")) or 1)
    tier = body.get("service_tier")
    facts.service_tier = tier if isinstance(tier, str) else None
    facts.background = body.get("background") is True
    prev = body.get("previous_response_id")
    facts.previous_response_id = prev if isinstance(prev, str) and prev else None
    conversation = body.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    facts.conversation = conversation if isinstance(conversation, str) and conversation else None
    for key in ("safety_identifier", "user"):
        if isinstance(body.get(key), str) and body[key]:
            facts.end_user = body[key]
            break
    if ep.kind is Kind.IMAGES:
        facts.units = positive_int(body.get("n")) or 1
        size = body.get("size") if isinstance(body.get("size"), str) else "1024x1024"
        quality = body.get("quality") if isinstance(body.get("quality"), str) else "auto"
        facts.size = f"{size}/{quality}"
    elif ep.kind is Kind.SPEECH:
        text = body.get("input")
        facts.units = len(text) if isinstance(text, str) else 0
    return facts


def form_request(ep: Endpoint, form: Form) -> tuple[RequestFacts, Prompt]:
    """Image edits and transcriptions come as forms: their model, what is asked, and the
    text and media that are input."""
    fields = form.fields
    facts = RequestFacts(model=fields.get("model") or None)
    p = Prompt(texts=[fields["prompt"]] if fields.get("prompt") else [])
    if ep.kind is Kind.IMAGES:
        facts.units = int(fields["n"]) if fields.get("n", "").isdigit() else 1
        facts.size = f"{fields.get('size') or '1024x1024'}/{fields.get('quality') or 'auto'}"
        facts.input_images = sum(1 for f in form.files if f.name.startswith("image"))
    else:
        facts.units = sum(audio_seconds(f)[0] for f in form.files) or 1
        facts.stream = fields.get("stream") == "true"
    for key in ("safety_identifier", "user"):
        if fields.get(key):
            facts.end_user = fields[key]
            break
    return facts, p


def prompt(body: JSONObj) -> Prompt:
    """The text of a request that the provider will count as input, plus fixed overheads
    and media parts."""
    p = Prompt()
    if isinstance(body.get("messages"), list):
        _messages(p, body["messages"])
        p.fixed_tokens += _PER_REQUEST
    for key in ("prompt", "input"):
        if key in body:
            _input(p, body[key])
    for key in ("instructions", "system"):
        if isinstance(body.get(key), str):
            p.texts.append(body[key])
    for key in ("tools", "functions", "response_format", "text"):
        if body.get(key) not in (None, "", [], {}):
            p.texts.append(compact_json(body[key]))
    return p


def _messages(p: Prompt, messages: list[Any]) -> None:
    for message in messages:
        p.fixed_tokens += _PER_MESSAGE
        if isinstance(message, dict):
            for key, value in message.items():
                if key == "content":
                    _content(p, value)
                elif key == "tool_calls":
                    p.texts.append(compact_json(value))
                elif isinstance(value, str):
                    p.texts.append(value)
        else:
            _content(p, message)


def _content(p: Prompt, content: Any) -> None:
    if isinstance(content, str):
        p.texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                p.texts.append(part)
            elif isinstance(part, dict):
                kind = str(part.get("type", ""))
                if "image" in kind:
                    p.media.append(_image(part))
                elif "audio" in kind:
                    data = (part.get("input_audio") or {}).get("data")
                    size = len(data) * 3 // 4 if isinstance(data, str) else None
                    p.media.append(Media("audio", size_bytes=size, remote=size is None))
                elif "file" in kind:
                    p.media.append(_file(part))
                for key in ("text", "output", "arguments", "input_text"):
                    if isinstance(part.get(key), str):
                        p.texts.append(part[key])
                if isinstance(part.get("content"), (str, list)):
                    _content(p, part["content"])


def _image(part: dict[str, Any]) -> Media:
    url = part.get("image_url")
    detail = part.get("detail")
    if isinstance(url, dict):
        detail = url.get("detail", detail)
        url = url.get("url")
    return media_of_url(url if isinstance(url, str) else None, detail)


def _file(part: dict[str, Any]) -> Media:
    f = part.get("file") if isinstance(part.get("file"), dict) else part
    data = f.get("file_data") if isinstance(f, dict) else None
    if isinstance(data, str) and "," in data:
        return Media("file", size_bytes=len(data.split(",", 1)[1]) * 3 // 4)
    return Media("file", remote=True)


def _input(p: Prompt, value: Any) -> None:
    if isinstance(value, str):
        p.texts.append(value)
    elif isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            p.fixed_tokens += len(value)  # already tokens
            return
        for item in value:
            if isinstance(item, list) and all(isinstance(v, int) for v in item):
                p.fixed_tokens += len(item)
            elif isinstance(item, dict):
                p.fixed_tokens += _PER_MESSAGE
                _content(p, [item])
            else:
                _input(p, item)


def set_cap(ep: Endpoint, body: JSONObj, tokens: int) -> JSONObj:
    """Cap the output at `tokens`: in the key the request uses, else the endpoint's own."""
    patched = dict(body)
    used = [k for k in CAP_KEYS if positive_int(body.get(k))]
    if used:
        for key in used:
            patched[key] = min(int(body[key]), tokens)
    elif ep.name == "responses":
        patched["max_output_tokens"] = tokens
    elif ep.name == "completions":
        patched["max_tokens"] = tokens
    else:
        patched["max_completion_tokens"] = tokens  # includes reasoning tokens
    return patched


_USAGE_CHUNK_ENDPOINTS = frozenset({"chat/completions", "completions"})


def ask_for_usage(ep: Endpoint, body: JSONObj) -> JSONObj | None:
    """Chat and completions streams carry usage only when asked (Responses always do)."""
    if ep.name not in _USAGE_CHUNK_ENDPOINTS:
        return None
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    patched = dict(body)
    base = options if isinstance(options, dict) else {}
    patched["stream_options"] = {**base, "include_usage": True}
    return patched


# -- usage ----------------------------------------------------------------------------------


def parse_usage(raw: Any) -> Usage:
    """A provider `usage` object in any of the OpenAI shapes -> Usage(source=provider)."""
    if not isinstance(raw, dict):
        raise InvalidUsage(f"usage is {type(raw).__name__}, not an object")
    in_key = next((k for k in ("prompt_tokens", "input_tokens") if k in raw), None)
    out_key = next((k for k in ("completion_tokens", "output_tokens") if k in raw), None)
    if in_key is None and out_key is None:
        raise InvalidUsage("usage has neither prompt_tokens nor input_tokens")
    usage = Usage(source=PROVIDER)
    usage.input_tokens = count(raw, in_key) if in_key else 0
    usage.output_tokens = count(raw, out_key) if out_key else 0
    in_details = (
        raw.get("prompt_tokens_details")
        or raw.get("input_tokens_details")
        or raw.get("input_token_details")  # transcriptions
        or {}
    )
    out_details = raw.get("completion_tokens_details") or raw.get("output_tokens_details") or {}
    if isinstance(in_details, dict):
        usage.cached_input_tokens = count(in_details, "cached_tokens", "input details: ")
        usage.cache_write_tokens = count(in_details, "cache_creation_tokens", "input details: ")
        usage.image_input_tokens = count(in_details, "image_tokens", "input details: ")
        usage.audio_input_tokens = count(in_details, "audio_tokens", "input details: ")
    if isinstance(out_details, dict):
        usage.reasoning_tokens = count(out_details, "reasoning_tokens", "output details: ")
    # Anthropic-style fields, as some OpenAI-compatible gateways pass them through (their
    # prompt_tokens already include them).
    if not usage.cached_input_tokens:
        usage.cached_input_tokens = count(raw, "cache_read_input_tokens")
    if not usage.cache_write_tokens:
        usage.cache_write_tokens = count(raw, "cache_creation_input_tokens")
    usage.check()
    return usage


FINAL_TYPES = frozenset({"response.completed", "response.incomplete", "response.failed"})


def facts_from_body(obj: Any) -> BodyFacts:
    """Facts from a response object (chat/completions/embeddings/responses/images)."""
    facts = BodyFacts()
    if not isinstance(obj, dict):
        return facts
    if (
        obj.get("object") == "response"
        or obj.get("type") in FINAL_TYPES
        or (obj.get("type") == "response.created")
    ):
        obj = obj.get("response", obj)
        if not isinstance(obj, dict):
            return facts
    model = obj.get("model")
    facts.model = model if isinstance(model, str) else None
    tier = obj.get("service_tier")
    facts.service_tier = tier if isinstance(tier, str) else None
    if obj.get("object") == "response":
        rid, status = obj.get("id"), obj.get("status")
        facts.response_id = rid if isinstance(rid, str) else None
        facts.status = status if isinstance(status, str) else None
    if isinstance(obj.get("data"), list) and "created" in obj and "usage" not in obj:
        facts.units = len(obj["data"])  # images generated, priced per image
    raw = obj.get("usage")
    if isinstance(raw, dict) and raw.get("type") == "duration":  # a transcription
        seconds = raw.get("seconds")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            facts.units = math.ceil(seconds)
        return facts
    if raw is None and isinstance(obj.get("duration"), (int, float)) and obj["duration"] >= 0:
        facts.units = math.ceil(obj["duration"])  # verbose_json
        return facts
    if raw is not None:
        try:
            facts.usage = parse_usage(raw)
            facts.usage.service_tier = facts.service_tier
        except InvalidUsage as e:
            facts.usage_error = f"invalid provider usage: {e}"
    return facts


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


# -- streams --------------------------------------------------------------------------------

_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_NULL_USAGE = b',"usage":null'
_PLAIN_DELTA = frozenset({"content", "role"})
_CONTENT_DELTA = b'"delta":{"content":"'
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')


class ChatReader(Marked):
    """Chat completions and legacy completions: usage in a chunk with empty `choices`,
    then `data: [DONE]`."""

    markers = (b'"usage":{', b'"usage": {', b"[DONE]")

    def __init__(self, strip_usage: bool) -> None:
        self.strip = strip_usage
        self.facts = BodyFacts()
        self.model: str | None = None

    def sniff_model(self, data: bytes) -> None:
        if self.model is None and (m := _MODEL.search(data)) is not None:
            self.model = m.group(1).decode("utf-8", "replace")

    def event(self, raw: bytes, obj: Any) -> Verdict:
        if obj is None and b"[DONE]" in raw:
            return Verdict.FINAL
        self.sniff_model(raw)
        if isinstance(obj, dict) and "usage" in obj and isinstance(obj["usage"], dict):
            facts = facts_from_body(obj)
            if facts.usage is not None or facts.usage_error is not None:
                self.facts = facts
                if facts.model:
                    self.model = facts.model
            if self.strip and obj.get("choices") == [] and facts.usage is not None:
                return Verdict.DROP  # the usage chunk the client did not ask for
        return Verdict.SEND

    def texts(self, obj: Any) -> Iterable[str]:
        # Most chunks of a stream: one choice whose delta is a piece of content (the
        # stream budget reads every one of them; output_texts is the general case).
        if type(obj) is dict:
            choices = obj.get("choices")
            if type(choices) is list and len(choices) == 1 and type(choices[0]) is dict:
                delta = choices[0].get("delta")
                if type(delta) is dict and delta.keys() <= _PLAIN_DELTA:
                    content = delta.get("content")
                    return (content,) if type(content) is str else ()
        return output_texts(obj)

    def plain_text(self, payload: bytes) -> str | None:
        # Most chunks of a stream, as OpenAI writes them: one choice whose delta is only a
        # piece of content. A JSON string holds no bare quote, so without a backslash the
        # content is the bytes up to the next quote; anything else is parsed. A stream
        # budget reads every chunk, and orjson.loads was a third of that (1.6 us a chunk).
        first = payload.find(b'"delta"')
        if first < 0 or not payload.startswith(_CONTENT_DELTA, first):
            return None
        start = first + len(_CONTENT_DELTA)
        end = payload.find(b'"', start)
        if (
            end < 0
            or payload[end + 1 : end + 2] != b"}"  # the delta ends with its content
            or payload.find(b'"delta"', end) >= 0  # a second choice
            or payload.find(b"\\", start, end) >= 0  # escapes: orjson decodes them
        ):
            return None
        try:
            return payload[start:end].decode()
        except UnicodeDecodeError:
            return None

    def rewrite(self, data: bytes) -> bytes:
        # With include_usage on, OpenAI adds `"usage":null` to every chunk; a client that
        # did not ask for usage would not have seen it.
        if self.strip and _NULL_USAGE in data:
            return data.replace(_NULL_USAGE, b"")
        return data

    def oversize(self, head: bytes, tail: bytes) -> Verdict:
        usage = tail_usage(tail)
        if usage is not None:
            self.facts = BodyFacts(usage=usage, model=self.model)
        return Verdict.SEND


class ResponsesReader(Marked):
    """Responses streams: the response object in `response.created` (its id) and in the
    final `response.completed|incomplete|failed` (its usage); no `[DONE]`."""

    markers = (b"response.completed", b"response.incomplete", b"response.failed",
               b"response.created", b'"usage":{')  # fmt: skip

    def __init__(self) -> None:
        self.facts = BodyFacts()
        self.model: str | None = None
        self.response_id: str | None = None

    def sniff_model(self, data: bytes) -> None:
        if self.model is None and (m := _MODEL.search(data)) is not None:
            self.model = m.group(1).decode("utf-8", "replace")

    def event(self, raw: bytes, obj: Any) -> Verdict:
        if not isinstance(obj, dict):
            return Verdict.SEND
        kind = obj.get("type")
        if kind == "response.created" or kind in FINAL_TYPES:
            facts = facts_from_body(obj)
            self.response_id = facts.response_id or self.response_id
            if facts.model:
                self.model = facts.model
            if kind in FINAL_TYPES:
                self.facts = facts
                self.facts.response_id = self.response_id
                return Verdict.FINAL
        return Verdict.SEND

    def texts(self, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def rewrite(self, data: bytes) -> bytes:
        return data

    def oversize(self, head: bytes, tail: bytes) -> Verdict:
        """A final event can echo megabytes of `instructions`; its usage sits near its end."""
        if not any(t.encode() in head[:4096] for t in FINAL_TYPES):
            return Verdict.SEND
        usage = tail_usage(tail)
        self.facts = BodyFacts(usage=usage, model=self.model, response_id=self.response_id)
        if usage is None:
            self.facts.usage_error = "the final event is too large and its usage was not found"
        return Verdict.FINAL


def tail_usage(tail: bytes) -> Usage | None:
    """The last `"usage": {...}` object in the last bytes of an event too large to parse."""
    starts = [m.end() - 1 for m in _USAGE_KEY.finditer(tail)]
    for start in reversed(starts):
        try:
            obj, _ = _DECODER.raw_decode(tail[start:].decode("utf-8", "replace"))
            return parse_usage(obj)
        except (ValueError, InvalidUsage):
            continue
    return None


_DECODER = json.JSONDecoder()


# -- errors ---------------------------------------------------------------------------------


def error_body(type_: str, code: str, message: str, param: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code,
                                   "param": param}})  # fmt: skip


def cut_event(ep: Endpoint, type_: str, code: str, message: str) -> bytes:
    """An error event the OpenAI SDKs raise as `APIError(message)`, then the stream's end
    (`[DONE]` for chat and completions; Responses streams have no terminator)."""
    error = {"message": message, "type": type_, "code": code, "param": None}
    if ep.name == "responses":
        data = orjson.dumps({"type": "error", "code": code, "message": message, "error": error})
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + orjson.dumps({"error": error}) + b"\n\ndata: [DONE]\n\n"


def upstream_error_message(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        message = obj["error"].get("message")
        return message if isinstance(message, str) else None
    return None


class OpenAIShape:
    name = "openai"
    credential_headers = frozenset({"authorization", "api-key"})

    def endpoint(self, tail: str, method: str) -> Endpoint | None:
        return classify(tail, method)

    def request(self, ep: Endpoint, body: JSONObj) -> RequestFacts:
        return request_facts(ep, body)

    def prompt(self, ep: Endpoint, body: JSONObj) -> Prompt:
        return prompt(body)

    def form_request(self, ep: Endpoint, form: Form) -> tuple[RequestFacts, Prompt]:
        return form_request(ep, form)

    def set_cap(self, ep: Endpoint, body: JSONObj, tokens: int) -> JSONObj:
        return set_cap(ep, body, tokens)

    def ask_for_usage(self, ep: Endpoint, body: JSONObj) -> JSONObj | None:
        return ask_for_usage(ep, body)

    def body_facts(self, ep: Endpoint, obj: Any) -> BodyFacts:
        return facts_from_body(obj)

    def output_texts(self, ep: Endpoint, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def stream_reader(self, ep: Endpoint, strip_usage: bool) -> ChatReader | ResponsesReader:
        if ep.name in ("responses", RETRIEVE):
            return ResponsesReader()
        return ChatReader(strip_usage)

    def error_body(self, status: int, type_: str, code: str, message: str,
                   param: str | None) -> bytes:  # fmt: skip
        return error_body(type_, code, message, param)

    def cut_event(self, ep: Endpoint, type_: str, code: str, message: str) -> bytes:
        return cut_event(ep, type_, code, message)

    def upstream_error_message(self, obj: Any) -> str | None:
        return upstream_error_message(obj)

    def upstream_url(self, base_url: str, prefix: str, path: str, query: str) -> str:
        """OpenAI's base URLs end in the version (`https://api.openai.com/v1`)."""
        url = f"{base_url}/{path}"
        return f"{url}?{query}" if query else url

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}
