"""Google's Gemini API: `models/{model}:generateContent` and `:streamGenerateContent`
(`alt=sse`), under `/v1beta/` (and `/v1/`).

Usage is `usageMetadata`: `promptTokenCount` includes `cachedContentTokenCount`;
`candidatesTokenCount` excludes the thinking tokens, `thoughtsTokenCount`, which are
billed as output; `toolUsePromptTokenCount` is input too. A stream carries usage so far in
its chunks: the last one counts; the chunk with a `finishReason` is the final one.
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
    Media,
    Prompt,
    RequestFacts,
    Verdict,
)
from proxy.shapes.openai import positive_int
from proxy.shapes.prompts import compact_json, media_of_base64
from proxy.usage import PROVIDER, InvalidUsage, Usage, count

_ACTION = re.compile(r"(?:tunedModels|models)/([^/:]+):([A-Za-z]+)")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT",
           429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip


@lru_cache(maxsize=1024)
def classify(tail: str, method: str) -> Endpoint:
    if method != "POST":
        return Endpoint(tail, Kind.FREE, "none")
    m = _ACTION.fullmatch(tail)
    if m is not None:
        model, action = m.group(1), m.group(2)
        if action == "generateContent":
            return Endpoint("generateContent", Kind.TOKENS, "json", model=model)
        if action == "streamGenerateContent":
            return Endpoint("streamGenerateContent", Kind.TOKENS, "json", model=model, stream=True)
        if action == "countTokens":
            return Endpoint(tail, Kind.FREE, "none")
    if tail.lower().endswith("files") or tail.lower().startswith("v1beta/files"):
        return Endpoint(tail, Kind.FREE, "none")  # uploads (/upload/v1beta/files)
    return Endpoint(tail, Kind.UNPRICED, "none")  # embeddings, caches, Imagen, batches...


def request_facts(body: JSONObj) -> RequestFacts:
    facts = RequestFacts()
    found = body.get("generationConfig")
    config: dict[str, Any] = found if isinstance(found, dict) else {}
    facts.cap = positive_int(config.get("maxOutputTokens"))
    facts.choices = positive_int(config.get("candidateCount")) or 1
    cached = body.get("cachedContent")
    facts.conversation = cached if isinstance(cached, str) and cached else None  # unseen input
    return facts


def prompt(body: JSONObj) -> Prompt:
    p = Prompt()
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        _parts(p, system.get("parts"))
    contents = body.get("contents")
    if isinstance(contents, list):
        for content in contents:
            if isinstance(content, dict):
                p.fixed_tokens += 4
                _parts(p, content.get("parts"))
    if body.get("tools"):
        p.texts.append(compact_json(body["tools"]))
    return p


def _parts(p: Prompt, parts: Any) -> None:
    if not isinstance(parts, list):
        return
    for part in parts:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            p.texts.append(part["text"])
        inline = part.get("inlineData") or part.get("inline_data")
        if isinstance(inline, dict):
            mime = inline.get("mimeType") or inline.get("mime_type")
            kind = "image" if str(mime).startswith("image/") else (
                "audio" if str(mime).startswith("audio/") else "file")  # fmt: skip
            p.media.append(media_of_base64(kind, mime, inline.get("data")))
        if isinstance(part.get("fileData") or part.get("file_data"), dict):
            p.media.append(Media("file", remote=True))
        for key in ("functionCall", "functionResponse"):
            if part.get(key) is not None:
                p.texts.append(compact_json(part[key]))


def set_cap(body: JSONObj, tokens: int) -> JSONObj:
    """`maxOutputTokens` bounds thinking too (thoughts and answer share it)."""
    patched = dict(body)
    config = dict(body.get("generationConfig") or {})
    current = positive_int(config.get("maxOutputTokens"))
    config["maxOutputTokens"] = min(current, tokens) if current else tokens
    patched["generationConfig"] = config
    return patched


def parse_usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        raise InvalidUsage(f"usageMetadata is {type(raw).__name__}, not an object")
    if "promptTokenCount" not in raw:
        raise InvalidUsage("usageMetadata has no promptTokenCount")
    thoughts = count(raw, "thoughtsTokenCount")
    usage = Usage(
        input_tokens=count(raw, "promptTokenCount") + count(raw, "toolUsePromptTokenCount"),
        cached_input_tokens=count(raw, "cachedContentTokenCount"),
        output_tokens=count(raw, "candidatesTokenCount") + thoughts,
        reasoning_tokens=thoughts,
        source=PROVIDER,
    )
    usage.check()
    return usage


def facts_from_body(obj: Any) -> BodyFacts:
    facts = BodyFacts()
    if isinstance(obj, list):  # a stream without alt=sse: a JSON array of chunks
        for item in obj:
            chunk = facts_from_body(item)
            if chunk.usage is not None or chunk.usage_error is not None:
                facts = chunk
        return facts
    if not isinstance(obj, dict):
        return facts
    version = obj.get("modelVersion")
    facts.model = version if isinstance(version, str) else None
    rid = obj.get("responseId")
    facts.response_id = rid if isinstance(rid, str) else None
    raw = obj.get("usageMetadata")
    if raw is not None:
        try:
            facts.usage = parse_usage(raw)
        except InvalidUsage as e:
            facts.usage_error = f"invalid provider usage: {e}"
    return facts


def output_texts(obj: Any) -> Iterator[str]:
    items = obj if isinstance(obj, list) else [obj]
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("candidates"), list):
            continue
        for candidate in item["candidates"]:
            content = candidate.get("content") if isinstance(candidate, dict) else None
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict):
                    if isinstance(part.get("text"), str):
                        yield part["text"]
                    if part.get("functionCall") is not None:
                        yield compact_json(part["functionCall"])


class GenerateReader(Marked):
    markers = (b"usageMetadata", b"finishReason", b'"error"')

    def __init__(self) -> None:
        self.facts = BodyFacts()
        self.model: str | None = None

    def sniff_model(self, data: bytes) -> None:
        """Every chunk that names the model carries usage too: parsed anyway."""

    def event(self, raw: bytes, obj: Any) -> Verdict:
        if not isinstance(obj, dict):
            return Verdict.SEND
        facts = facts_from_body(obj)
        self.model = facts.model or self.model
        if facts.usage is not None or facts.usage_error is not None:
            self.facts = facts
            self.facts.model = self.model
        candidates = obj.get("candidates")
        if isinstance(candidates, list) and any(
            isinstance(c, dict) and c.get("finishReason") for c in candidates
        ):
            return Verdict.FINAL
        return Verdict.SEND

    def texts(self, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def rewrite(self, data: bytes) -> bytes:
        return data

    def oversize(self, head: bytes, tail: bytes) -> Verdict:
        return Verdict.SEND


class GeminiShape:
    name = "gemini"
    credential_headers = frozenset({"x-goog-api-key", "authorization"})

    def endpoint(self, tail: str, method: str) -> Endpoint | None:
        return classify(tail, method)

    def request(self, ep: Endpoint, body: JSONObj) -> RequestFacts:
        return request_facts(body)

    def prompt(self, ep: Endpoint, body: JSONObj) -> Prompt:
        return prompt(body)

    def form_request(self, ep: Endpoint, form: Form) -> tuple[RequestFacts, Prompt]:
        return RequestFacts(), Prompt()

    def set_cap(self, ep: Endpoint, body: JSONObj, tokens: int) -> JSONObj:
        return set_cap(body, tokens)

    def ask_for_usage(self, ep: Endpoint, body: JSONObj) -> JSONObj | None:
        return None  # every chunk carries usage so far

    def body_facts(self, ep: Endpoint, obj: Any) -> BodyFacts:
        return facts_from_body(obj)

    def output_texts(self, ep: Endpoint, obj: Any) -> Iterator[str]:
        return output_texts(obj)

    def stream_reader(self, ep: Endpoint, strip_usage: bool) -> GenerateReader:
        return GenerateReader()

    def error_body(self, status: int, type_: str, code: str, message: str,
                   param: str | None) -> bytes:  # fmt: skip
        return orjson.dumps({"error": {"code": status, "message": message,
                                       "status": _STATUS.get(status, "INTERNAL"),
                                       "details": [{"reason": code}]}})  # fmt: skip

    def cut_event(self, ep: Endpoint, type_: str, code: str, message: str) -> bytes:
        body = self.error_body(429, type_, code, message, None)
        return b"data: " + body + b"\r\n\r\n"

    def upstream_error_message(self, obj: Any) -> str | None:
        error = obj.get("error") if isinstance(obj, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return message if isinstance(message, str) else None

    def upstream_url(self, base_url: str, prefix: str, path: str, query: str) -> str:
        """The version the client asked for (`v1beta`, `v1`) is part of the path."""
        url = f"{base_url}/{prefix}/{path}"
        return f"{url}?{query}" if query else url

    def credentials(self, api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}
