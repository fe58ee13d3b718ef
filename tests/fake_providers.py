"""Fake Anthropic and Gemini providers: real aiohttp servers speaking each API's format,
scripted like `FakeUpstream` (per test, or per request with an `x-fake` JSON header), and
keeping what they billed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_upstream import Bill, Seen

ANTHROPIC: dict[str, Any] = {
    "input_tokens": 20,  # uncached input
    "cache_creation_input_tokens": 0,
    "cache_1h": 0,  # of the cache writes, those for an hour
    "cache_read_input_tokens": 0,
    "output_tokens": 10,
    "chunks": 4,
    "delay": 0.0,
    "chunk_delay": 0.0,
    "text": "Hello",
    "service_tier": "standard",
    "status": 200,
}
GEMINI: dict[str, Any] = {
    "prompt": 30,
    "cached": 0,
    "candidates": 12,
    "thoughts": 0,
    "chunks": 3,
    "model_version": "gemini-2.5-flash",
    "status": 200,
}


@dataclass
class FakeProvider:
    defaults: dict[str, Any]
    script: dict[str, Any] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    bills: list[Bill] = field(default_factory=list)

    def settings(self, request: web.Request) -> dict[str, Any]:
        s = {**self.defaults, **self.script}
        if "x-fake" in request.headers:
            s.update(json.loads(request.headers["x-fake"]))
        return s

    async def seen(self, request: web.Request) -> bytes:
        body = await request.read()
        self.requests.append(Seen(request.method, request.path, request.query_string,
                                  dict(request.headers), body))  # fmt: skip
        return body


class FakeAnthropic(FakeProvider):
    def __init__(self) -> None:
        super().__init__(ANTHROPIC)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        await self.seen(request)
        return web.json_response({"data": [{"id": "claude-sonnet-4-5", "type": "model"}]})

    async def count_tokens(self, request: web.Request) -> web.Response:
        await self.seen(request)
        return web.json_response({"input_tokens": 42})

    def _usage(self, s: dict[str, Any], output: int) -> dict[str, Any]:
        writes = s["cache_creation_input_tokens"]
        return {
            "input_tokens": s["input_tokens"],
            "cache_creation_input_tokens": writes,
            "cache_read_input_tokens": s["cache_read_input_tokens"],
            "cache_creation": {"ephemeral_5m_input_tokens": writes - s["cache_1h"],
                               "ephemeral_1h_input_tokens": s["cache_1h"]},
            "output_tokens": output,
            "service_tier": s["service_tier"],
        }  # fmt: skip

    async def messages(self, request: web.Request) -> web.StreamResponse:
        req = json.loads(await self.seen(request))
        s = self.settings(request)
        if s["delay"]:
            await asyncio.sleep(s["delay"])
        if s["status"] != 200:
            return web.json_response({"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}}, status=s["status"])  # fmt: skip
        output = min(s["output_tokens"], req.get("max_tokens") or s["output_tokens"])
        billed_input = (s["input_tokens"] + s["cache_creation_input_tokens"]
                        + s["cache_read_input_tokens"])  # fmt: skip
        self.bills.append(Bill(req.get("model"), billed_input, output))
        message = {"id": "msg_fake1", "type": "message", "role": "assistant",
                   "model": req.get("model"), "stop_reason": "end_turn", "stop_sequence": None}  # fmt: skip
        if not req.get("stream"):
            return web.json_response({**message, "content": [{"type": "text", "text": s["text"]}],
                                      "usage": self._usage(s, output)})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = {**message, "content": [], "stop_reason": None, "usage": self._usage(s, 1)}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("ping", {"type": "ping"}),
        ]  # fmt: skip
        for i in range(s["chunks"]):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta",
                                                             "text": f"{s['text']} {i} "}}))  # fmt: skip
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": {"output_tokens": output}}),  # cumulative
            ("message_stop", {"type": "message_stop"}),
        ]  # fmt: skip
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            if s["chunk_delay"]:
                await asyncio.sleep(s["chunk_delay"])
        await resp.write_eof()
        return resp


class FakeGemini(FakeProvider):
    def __init__(self) -> None:
        super().__init__(GEMINI)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{version}/models/{action}", self.generate)
        return app

    def _usage(self, s: dict[str, Any]) -> dict[str, Any]:
        u = {"promptTokenCount": s["prompt"], "candidatesTokenCount": s["candidates"],
             "totalTokenCount": s["prompt"] + s["candidates"] + s["thoughts"]}  # fmt: skip
        if s["cached"]:
            u["cachedContentTokenCount"] = s["cached"]
        if s["thoughts"]:
            u["thoughtsTokenCount"] = s["thoughts"]
        return u

    async def generate(self, request: web.Request) -> web.StreamResponse:
        req = json.loads(await self.seen(request))
        s = self.settings(request)
        model, _, action = request.match_info["action"].partition(":")
        if s["status"] != 200:
            return web.json_response({"error": {"code": s["status"], "message": "quota",
                                                "status": "RESOURCE_EXHAUSTED"}},
                                     status=s["status"])  # fmt: skip
        cap = (req.get("generationConfig") or {}).get("maxOutputTokens")
        if isinstance(cap, int) and cap < s["candidates"] + s["thoughts"]:
            s = {**s, "thoughts": min(s["thoughts"], cap), "candidates": max(
                cap - min(s["thoughts"], cap), 0)}  # fmt: skip
        self.bills.append(Bill(model, s["prompt"], s["candidates"] + s["thoughts"]))
        final = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]},
                                 "finishReason": "STOP", "index": 0}],
                 "usageMetadata": self._usage(s), "modelVersion": s["model_version"],
                 "responseId": "gem-resp-1"}  # fmt: skip
        if action == "generateContent":
            return web.json_response(final)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(s["chunks"]):
            chunk = {"candidates": [{"content": {"role": "model", "parts": [{"text": f"w{i} "}]},
                                     "index": 0}],
                     "usageMetadata": {"promptTokenCount": s["prompt"],
                                       "totalTokenCount": s["prompt"]},
                     "modelVersion": s["model_version"]}  # fmt: skip
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
        await resp.write(b"data: " + json.dumps(final).encode() + b"\r\n\r\n")
        await resp.write_eof()
        return resp
