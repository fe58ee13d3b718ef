"""Relaying a server-sent-event stream while metering it.

`StreamMeter.feed()` takes bytes as they arrive and returns the bytes to send on: complete
events, unchanged, except (a) the usage-only chunk the proxy asked for on the client's
behalf, which is removed, and (b) the final event (`data: [DONE]`, `response.completed`),
which is held back until the call's ledger row is committed. A partial event waits for
its end: an SSE client cannot use half an event anyway.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from proxy.usage import BodyFacts, facts_from_body, output_texts

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_FINAL_TYPES = (b"response.completed", b"response.incomplete", b"response.failed")
# With include_usage on, OpenAI adds `"usage":null` to every chunk; a client that did not
# ask for usage would not have seen it.
_NULL_USAGE = b',"usage":null'
MAX_EVENT_BYTES = 1 << 20  # a longer "event" is relayed without being parsed
_KEEP_DATA_BYTES = 256 * 1024  # event payloads kept for estimating output, before folding
_KEEP_TEXT_CHARS = 256 * 1024  # generated text kept for tiktoken; beyond: 4 chars a token


def _payload(event: bytes) -> bytes:
    """The `data:` lines of one event, joined as the SSE spec says."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def _json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class StreamMeter:
    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.facts = BodyFacts()
        self.model: str | None = None
        self.final_seen = False
        self.events = 0
        self._tail = b""
        self._held: list[bytes] = []
        self._data: list[bytes] = []
        self._data_bytes = 0
        self.texts: list[str] = []
        self._text_chars = 0
        self.overflow_chars = 0  # generated characters beyond what is kept for tiktoken
        self.passthrough = False  # gave up parsing (an event over MAX_EVENT_BYTES)

    def feed(self, chunk: bytes) -> bytes:
        if self.passthrough:
            if self.final_seen:
                self._held.append(chunk)
                return b""
            return chunk
        buf = self._tail + chunk if self._tail else chunk
        out: list[bytes] = []
        changed = bool(self._tail)
        pos = 0
        for m in _BOUNDARY.finditer(buf):
            event = buf[pos : m.end()]
            pos = m.end()
            if not self._event(event, out):
                changed = True
        self._tail = buf[pos:]
        if self._tail:
            changed = True
            if len(self._tail) > MAX_EVENT_BYTES:
                out.append(self._tail)
                self._tail = b""
                self.passthrough = True
        data = chunk if not changed else b"".join(out)
        if self.strip_usage and _NULL_USAGE in data:
            data = data.replace(_NULL_USAGE, b"")
        return data

    def _event(self, event: bytes, out: list[bytes]) -> bool:
        """Route one complete event; False when it is not sent on right now."""
        self.events += 1
        if self.final_seen:
            self._held.append(event)
            return False
        final = False
        if (b"[DONE]" in event and _payload(event).strip() == b"[DONE]") or (
            b"response." in event and any(t in event for t in _FINAL_TYPES)
        ):
            final = True
        if self.model is None:
            m = _MODEL.search(event)
            if m is not None:
                self.model = m.group(1).decode("utf-8", "replace")
        if _HAS_USAGE.search(event):
            obj = _json(_payload(event))
            facts = facts_from_body(obj)
            if facts.usage is not None or facts.usage_error is not None:
                self.facts = facts
                if facts.model:
                    self.model = facts.model
            if (
                self.strip_usage
                and isinstance(obj, dict)
                and obj.get("choices") == []
                and facts.usage is not None
            ):
                return False  # the usage chunk the client did not ask for
        elif not final:
            self._keep(event)
        if final:
            self.final_seen = True
            self._held.append(event)
            return False
        out.append(event)
        return True

    def _keep(self, event: bytes) -> None:
        if self.facts.usage is not None:
            return
        self._data.append(event)
        self._data_bytes += len(event)
        if self._data_bytes > _KEEP_DATA_BYTES:
            self._fold()

    def _fold(self) -> None:
        for event in self._data:
            for text in output_texts(_json(_payload(event))):
                if self._text_chars < _KEEP_TEXT_CHARS:
                    self.texts.append(text)
                    self._text_chars += len(text)
                else:
                    self.overflow_chars += len(text)
        self._data.clear()
        self._data_bytes = 0

    def generated_texts(self) -> list[str]:
        """What the stream generated so far, for estimating output tokens."""
        self._fold()
        return self.texts

    def finish(self) -> bytes:
        """Everything held back (final event, partial tail): send after the commit."""
        held = b"".join(self._held) + self._tail
        self._held.clear()
        self._tail = b""
        if self.strip_usage and _NULL_USAGE in held:
            held = held.replace(_NULL_USAGE, b"")
        return held
