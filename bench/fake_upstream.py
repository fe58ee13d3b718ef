"""A fake OpenAI-compatible upstream on raw asyncio: fast enough never to be the bottleneck.

`python -m bench.fake_upstream --port 9100` serves, on HTTP/1.1 keep-alive:
  POST .../chat/completions   JSON, or SSE with 16 content chunks when "stream":true
                              (a usage chunk when "include_usage":true, like OpenAI)
  POST .../completions, .../embeddings, .../responses (JSON; responses also SSE)
  POST with "bench_big_stream" in the body: a 50 MB SSE stream, written with flow control
  GET  /__stats               counters of what was served
It parses no JSON: it looks for a few byte strings in the body.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections import Counter

STATS: Counter[str] = Counter()
CHUNKS = 16


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


USAGE = {
    "prompt_tokens": 21,
    "completion_tokens": 16,
    "total_tokens": 37,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
CHAT = _json(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)
EMBED = _json(
    {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 8}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
)
RESPONSE = _json(
    {
        "id": "resp_bench",
        "object": "response",
        "model": "gpt-4o",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hello there!"}],
            }
        ],
        "usage": {"input_tokens": 21, "output_tokens": 16},
    }
)


def _chunk(usage_null: bool, i: int) -> bytes:
    event = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    if usage_null:
        event["usage"] = None
    return b"data: " + _json(event) + b"\n\n"


def _stream(include_usage: bool) -> bytes:
    events = [_chunk(include_usage, i) for i in range(CHUNKS)]
    if include_usage:
        events.append(
            b"data: "
            + _json(
                {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [],
                    "usage": USAGE,
                }
            )
            + b"\n\n"
        )
    events.append(b"data: [DONE]\n\n")
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _responses_stream() -> bytes:
    events = [{"type": "response.created", "response": {"id": "r", "usage": None}}]
    events += [{"type": "response.output_text.delta", "delta": f"tok{i} "} for i in range(CHUNKS)]
    events.append({"type": "response.completed", "response": json.loads(RESPONSE)})
    raw = [f"event: {e['type']}\ndata: ".encode() + _json(e) + b"\n\n" for e in events]
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in raw) + b"0\r\n\r\n"


STREAM_WITH_USAGE = _stream(True)
STREAM_WITHOUT_USAGE = _stream(False)
RESPONSES_STREAM = _responses_stream()
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


class FakeUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.paused = asyncio.Event()
        self.paused.set()
        self.task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def pause_writing(self) -> None:
        self.paused.clear()

    def resume_writing(self) -> None:
        self.paused.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            lower = head.lower()
            i = lower.find(b"content-length:")
            if i >= 0:
                length = int(
                    lower[i + 15 : lower.find(b"\r\n", i) if lower.find(b"\r\n", i) > 0 else None]
                )
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.respond(head, body)

    def respond(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        path = head.split(b" ", 2)[1]
        if path == b"/__stats":
            out = _json(dict(STATS))
            self.transport.write(JSON_HEAD % len(out) + out)
            return
        stream = b'"stream":true' in body or b'"stream": true' in body
        if b"bench_big_stream" in body:
            STATS["big_stream"] += 1
            self.task = asyncio.ensure_future(self.big_stream())
            return
        if path.endswith(b"/chat/completions"):
            if stream:
                usage = b'"include_usage":true' in body or b'"include_usage": true' in body
                STATS["stream_usage" if usage else "stream_plain"] += 1
                self.transport.write(
                    SSE_HEAD + (STREAM_WITH_USAGE if usage else STREAM_WITHOUT_USAGE)
                )
                return
            STATS["chat"] += 1
            self.transport.write(JSON_HEAD % len(CHAT) + CHAT)
        elif path.endswith(b"/embeddings"):
            STATS["embeddings"] += 1
            self.transport.write(JSON_HEAD % len(EMBED) + EMBED)
        elif path.endswith(b"/responses"):
            STATS["responses"] += 1
            if stream:
                self.transport.write(SSE_HEAD + RESPONSES_STREAM)
            else:
                self.transport.write(JSON_HEAD % len(RESPONSE) + RESPONSE)
        else:
            STATS["other"] += 1
            out = b'{"object":"list","data":[]}'
            self.transport.write(JSON_HEAD % len(out) + out)

    async def big_stream(self, total: int = 50 * 1024 * 1024) -> None:
        """50 MB of SSE content chunks, honouring the reader's pace (no buffering here)."""
        assert self.transport is not None
        self.transport.write(SSE_HEAD)
        text = "x" * 8000
        event = b"data: " + _json({"choices": [{"index": 0, "delta": {"content": text}}]}) + b"\n\n"
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        sent = 0
        while sent < total:
            await self.paused.wait()
            if self.transport.is_closing():
                return
            self.transport.write(chunk)
            sent += len(event)
        done = (
            b"data: "
            + _json({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": total // 4}})
            + b"\n\ndata: [DONE]\n\n"
        )
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, "127.0.0.1", port, backlog=4096)
    print(f"fake upstream on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
