"""A fake OpenAI-compatible provider: a real aiohttp server on a random loopback port.

Behaviour is set per test through `FakeUpstream.script` (defaults) or per request with an
`x-fake` header holding JSON (the proxy forwards end-to-end headers), e.g.
`x-fake: {"chunks": 3, "prompt_tokens": 12}`.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import gzip
import json
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULTS: dict[str, Any] = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "cached_tokens": 0,
    "reasoning_tokens": 0,
    "chunks": 5,  # content chunks in a stream
    "send_usage": True,  # put usage in bodies / final stream events (when asked for)
    "usage": None,  # a raw usage object to send instead (e.g. nonsense values)
    "status": 200,
    "error_body": None,
    "delay": 0.0,  # seconds before the response starts
    "chunk_delay": 0.0,
    "gate_after": None,  # stream: wait on FakeUpstream.gate after this many chunks
    "cut_after": None,  # stream: drop the connection after this many chunks
    "stall_after": None,  # stream: go silent after this many chunks
    "not_json": False,
    "model": None,  # model reported back (default: the requested one)
    "service_tier": None,
    "content": "Hello",
    "after_final": 0,  # stream: bytes sent after the final event, in 64 KiB pieces
    "hold_open": False,  # stream: after the final event, keep the connection open, silent
    "compress": None,  # "gzip": compress the body whatever the client accepts
    "echo_instructions": False,  # Responses: echo the request's instructions, as OpenAI does
    "finish_reason": "stop",
    "chunk_text": None,  # stream: each chunk's text (default "tok0 ", "tok1 "...)
    # stream: one token per chunk, billed as sent: a stream cut mid-way bills what went out
    "token_chunks": False,
    "background_after": 0.0,  # background responses: seconds until they are finished
    "image_tokens": 4160,  # gpt-image: output tokens per image (1024x1024 high)
    "audio_tokens": 50,  # transcriptions: audio tokens in the usage
}


@dataclass
class Bill:
    """What the fake provider charged for one request: tokens it counted and generated."""

    model: str | None
    input: int
    output: int


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeUpstream:
    script: dict[str, Any] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    served: int = 0  # responses completed
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    chunks_sent: int = 0
    responses_made: int = 0  # Responses API objects answered (each gets its own id)
    cancelled: int = 0  # requests whose client (the proxy) went away before the end
    after_final_sent: int = 0  # bytes written after a stream's final event
    caps: list[int | None] = field(default_factory=list)  # the output cap of each request
    bills: list[Bill] = field(default_factory=list)
    background: dict[str, tuple[dict[str, Any], dict[str, Any], float]] = field(
        default_factory=dict
    )
    # A test's own handler for what the script cannot say (it gets the request, read).
    handle_override: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    def settings(self, request: web.Request) -> dict[str, Any]:
        s = {**DEFAULTS, **self.script}
        if "x-fake" in request.headers:
            s.update(json.loads(request.headers["x-fake"]))
        return s

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Seen(request.method, request.path, request.query_string, dict(request.headers), body)
        )
        if self.handle_override is not None:
            return await self.handle_override(request)
        s = self.settings(request)
        if s["delay"]:
            await asyncio.sleep(s["delay"])
        if s["status"] != 200:
            error = s["error_body"] or {
                "error": {"message": "fake upstream error", "type": "server_error", "code": None}
            }
            return web.json_response(error, status=s["status"])
        path = request.path
        if request.method == "GET" and path.endswith("/models"):
            return web.json_response({"object": "list", "data": [{"id": "gpt-4o"}]})
        if request.method == "GET" and "/responses/" in path:
            return self._retrieve(path.rsplit("/", 1)[-1])
        if path.endswith("/batches"):
            return web.json_response({"id": "batch_1", "object": "batch", "status": "validating"})
        if path.endswith(("/audio/transcriptions", "/audio/translations", "/images/edits")):
            return await self._form(request, path, s)
        if path.endswith("/audio/speech"):
            self.served += 1
            return web.Response(body=b"ID3fake-audio", content_type="audio/mpeg")
        if not path.endswith(("/completions", "/embeddings", "/responses", "/images/generations")):
            return web.json_response({"echo": path})
        req = json.loads(body) if body else {}
        if path.endswith("/images/generations"):
            return self._images(req, s)
        # A provider stops at the output cap it is given (the proxy's clamp relies on it).
        cap = next((req[k] for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                    if isinstance(req.get(k), int)), None)  # fmt: skip
        self.caps.append(cap)
        if cap is not None and cap < s["completion_tokens"]:
            s = {**s, "completion_tokens": cap, "chunks": min(s["chunks"], cap),
                 "finish_reason": "length"}  # fmt: skip
        if s["not_json"]:
            self.served += 1
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        if path.endswith("/embeddings"):
            return self._json(self._embeddings(req, s), s)
        if path.endswith("/responses"):
            if req.get("stream"):
                return await self._stream(request, s, self._responses_events(req, s))
            if req.get("background"):
                return self._queue(req, s)
            return self._json(self._response_obj(req, s), s)
        if path.endswith("/completions"):
            legacy = not path.endswith("/chat/completions")
            if req.get("stream"):
                events = self._chat_events(req, s, legacy)
                return await self._stream(request, s, events)
            return self._json(self._completion(req, s, legacy), s)
        return web.json_response({"echo": path})

    def _json(self, obj: dict[str, Any], s: dict[str, Any] | None = None) -> web.Response:
        self.served += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):

            def tokens(*keys: str) -> int:
                values = [usage.get(k) for k in keys]
                return next((v for v in values if isinstance(v, int)), 0)

            self.bills.append(Bill(obj.get("model"), tokens("prompt_tokens", "input_tokens"),
                                   tokens("completion_tokens", "output_tokens")))  # fmt: skip
        if s is not None and s["compress"] == "gzip":
            body = gzip.compress(json.dumps(obj).encode())
            return web.Response(body=body, content_type="application/json",
                                headers={"Content-Encoding": "gzip"})  # fmt: skip
        return web.json_response(obj)

    # -- bodies -------------------------------------------------------------------------

    @staticmethod
    def _usage(s: dict[str, Any], kind: str = "chat") -> dict[str, Any] | None:
        if s["usage"] is not None:
            return s["usage"]  # type: ignore[no-any-return]
        if not s["send_usage"]:
            return None
        p, c = s["prompt_tokens"], s["completion_tokens"]
        if kind == "responses":
            return {
                "input_tokens": p,
                "input_tokens_details": {"cached_tokens": s["cached_tokens"]},
                "output_tokens": c,
                "output_tokens_details": {"reasoning_tokens": s["reasoning_tokens"]},
                "total_tokens": p + c,
            }
        if kind == "embeddings":
            return {"prompt_tokens": p, "total_tokens": p}
        return {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": s["cached_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": s["reasoning_tokens"]},
        }

    def _completion(self, req: dict[str, Any], s: dict[str, Any], legacy: bool) -> dict[str, Any]:
        model = s["model"] or req.get("model")
        if legacy:
            choice = {"index": 0, "text": s["content"], "finish_reason": s["finish_reason"]}
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": s["content"]},
                "finish_reason": s["finish_reason"],
            }
        out = {
            "id": "chatcmpl-fake",
            "object": "text_completion" if legacy else "chat.completion",
            "created": 1,
            "model": model,
            "choices": [choice],
        }
        usage = self._usage(s)
        if usage is not None:
            out["usage"] = usage
        if s["service_tier"]:
            out["service_tier"] = s["service_tier"]
        return out

    def _embeddings(self, req: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        out = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": s["model"] or req.get("model"),
        }
        usage = self._usage(s, "embeddings")
        if usage is not None:
            out["usage"] = usage
        return out

    def _response_obj(self, req: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        self.responses_made += 1  # each its own id, as OpenAI's: chains are keyed by it
        out = {
            "id": f"resp_fake{self.responses_made}",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": s["model"] or req.get("model"),
            "output": [
                {
                    "type": "message",
                    "id": "msg_1",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": s["content"], "annotations": []}],
                }
            ],
        }
        if s["echo_instructions"] and isinstance(req.get("instructions"), str):
            out["instructions"] = req["instructions"]
        usage = self._usage(s, "responses")
        if usage is not None:
            out["usage"] = usage
        return out

    def _queue(self, req: dict[str, Any], s: dict[str, Any]) -> web.Response:
        rid = f"resp_bg{len(self.background) + 1}"
        self.background[rid] = (req, s, time.monotonic())
        final = self._response_obj(req, s)
        usage = final["usage"]
        self.bills.append(Bill(req.get("model"), usage["input_tokens"], usage["output_tokens"]))
        return web.json_response({"id": rid, "object": "response", "status": "queued",
                                  "model": req.get("model"), "output": [], "usage": None})  # fmt: skip

    def _retrieve(self, rid: str) -> web.Response:
        if rid not in self.background:
            return web.json_response({"error": {"message": "No such response"}}, status=404)
        req, s, created = self.background[rid]
        if time.monotonic() - created < s["background_after"]:
            return web.json_response({"id": rid, "object": "response", "status": "in_progress",
                                      "model": req.get("model"), "usage": None})  # fmt: skip
        obj = self._response_obj(req, s)
        obj["id"] = rid
        return web.json_response(obj)

    def _images(self, req: dict[str, Any], s: dict[str, Any]) -> web.Response:
        n = req.get("n") or 1
        self.served += 1
        out: dict[str, Any] = {"created": 1, "data": [{"b64_json": "AAAA"}] * n}
        if str(req.get("model", "")).startswith("gpt-image"):
            p = s["prompt_tokens"]
            out["usage"] = {"input_tokens": p, "input_tokens_details": {"text_tokens": p,
                            "image_tokens": 0}, "output_tokens": s["image_tokens"] * n,
                            "total_tokens": p + s["image_tokens"] * n}  # fmt: skip
            self.bills.append(Bill(req.get("model"), p, s["image_tokens"] * n))
        return web.json_response(out)

    async def _form(self, request: web.Request, path: str, s: dict[str, Any]) -> web.Response:
        self.served += 1
        raw = await request.read()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + request.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
        )
        fields = {
            str(part.get_param("name", header="content-disposition")): part.get_content()
            for part in message.iter_parts()
            if part.get_filename() is None
        }
        model = fields.get("model", "")
        if path.endswith("/images/edits"):
            return self._images({"model": model, "n": int(fields.get("n", 1))}, s)
        out: dict[str, Any] = {"text": "hello there"}
        if "transcribe" in model:
            out["usage"] = {"type": "tokens", "input_tokens": s["audio_tokens"],
                            "input_token_details": {"text_tokens": 0,
                                                    "audio_tokens": s["audio_tokens"]},
                            "output_tokens": 3, "total_tokens": s["audio_tokens"] + 3}  # fmt: skip
        return web.json_response(out)

    # -- streams ------------------------------------------------------------------------

    def _chat_events(self, req: dict[str, Any], s: dict[str, Any], legacy: bool) -> list[bytes]:
        model = s["model"] or req.get("model")
        include = bool((req.get("stream_options") or {}).get("include_usage"))
        kind = "text_completion" if legacy else "chat.completion.chunk"
        events = []
        for i in range(s["chunks"]):
            text = s["chunk_text"] if s["chunk_text"] is not None else f"tok{i} "
            if legacy:
                choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": None}
            else:
                choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            chunk: dict[str, Any] = {"id": "c1", "object": kind, "created": 1, "model": model,
                                     "choices": [choice]}  # fmt: skip
            if include:
                chunk["usage"] = None
            events.append(chunk)
        usage = self._usage(s)
        if include and usage is not None:
            events.append({"id": "c1", "object": kind, "created": 1, "model": model,
                           "choices": [], "usage": usage})  # fmt: skip
        out = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
        out.append(b"data: [DONE]\n\n")
        return out

    def _responses_events(self, req: dict[str, Any], s: dict[str, Any]) -> list[bytes]:
        model = s["model"] or req.get("model")
        final = self._response_obj(req, s)
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {"id": final["id"], "object": "response",
                                                      "model": model, "usage": None}},
        ]  # fmt: skip
        for i in range(s["chunks"]):
            text = s["chunk_text"] if s["chunk_text"] is not None else f"tok{i} "
            events.append({"type": "response.output_text.delta", "delta": text})
        events.append({"type": "response.completed", "response": final})
        return [
            f"event: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n".encode()
            for e in events
        ]

    async def _stream(
        self, request: web.Request, s: dict[str, Any], events: list[bytes]
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream"}
        squeeze = None
        if s["compress"] == "gzip":
            headers["Content-Encoding"] = "gzip"
            squeeze = zlib.compressobj(wbits=31)
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)

        async def write(data: bytes) -> None:
            await resp.write(squeeze.compress(data) + squeeze.flush(zlib.Z_SYNC_FLUSH)
                             if squeeze is not None else data)  # fmt: skip

        model = json.loads(await request.read() or b"{}").get("model")
        generated = 0  # content chunks that went out
        completed = False
        try:
            for i, event in enumerate(events):
                if s["cut_after"] is not None and i == s["cut_after"]:
                    assert request.transport is not None
                    # A reset makes the peer drop what it has not read yet: let it read first.
                    await asyncio.sleep(0.05)
                    request.transport.abort()
                    return resp
                if s["stall_after"] is not None and i == s["stall_after"]:
                    await asyncio.sleep(3600)
                if s["gate_after"] is not None and i == s["gate_after"]:
                    await self.gate.wait()
                await write(event)
                self.chunks_sent += 1
                if b'"content":' in event or b"output_text.delta" in event:
                    generated += 1
                if s["chunk_delay"]:
                    await asyncio.sleep(s["chunk_delay"])
            completed = True
        finally:
            if s["token_chunks"]:  # billed as generated, cut or not
                self.bills.append(Bill(model, s["prompt_tokens"], generated))
            elif completed:
                self.bills.append(Bill(model, s["prompt_tokens"], s["completion_tokens"]))
        self.served += 1
        piece = b": keep-alive padding " + b"x" * (64 * 1024 - 23) + b"\n\n"
        while self.after_final_sent < s["after_final"]:
            await write(piece)
            self.after_final_sent += len(piece)
            await asyncio.sleep(0.001)
        if s["hold_open"]:
            await asyncio.sleep(3600)
        if squeeze is not None:
            await resp.write(squeeze.flush())
        await resp.write_eof()
        return resp
