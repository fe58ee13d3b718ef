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
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")
# What makes an event matter to metering: a usage object, the end of the stream.
_MARKERS = (b'"usage":{', b'"usage": {', b"[DONE]", *_FINAL_TYPES)
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


def _has_marker(chunk: bytes) -> bool:
    """`any(m in chunk for m in _MARKERS)`, unrolled: this runs for every chunk."""
    return (
        b'"usage":{' in chunk
        or b'"usage": {' in chunk
        or b"[DONE]" in chunk
        or b"response.completed" in chunk
        or b"response.incomplete" in chunk
        or b"response.failed" in chunk
    )


def _last_boundary(buf: bytes, limit: int) -> int:
    """The end of the last complete event in buf[:limit] (0: none)."""
    return max(
        (p + len(sep) for sep in _SEPARATORS if (p := buf.rfind(sep, 0, limit)) >= 0), default=0
    )


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
        if (
            not self._tail
            and not self.final_seen
            and chunk.endswith(_SEPARATORS)
            and not _has_marker(chunk)
        ):
            # Whole events, none of which matters to metering: most chunks of any stream.
            if self.model is None:
                m = _MODEL.search(chunk)
                if m is not None:
                    self.model = m.group(1).decode("utf-8", "replace")
            self._keep(chunk)
            if self.strip_usage and _NULL_USAGE in chunk:
                return chunk.replace(_NULL_USAGE, b"")
            return chunk
        buf = self._tail + chunk if self._tail else chunk
        end = _last_boundary(buf, len(buf))
        out: list[bytes] = []
        self._tail = (self._route(buf[:end], out) if end else b"") + buf[end:]
        if len(self._tail) > MAX_EVENT_BYTES:
            out.append(self._tail)
            self._tail = b""
            self.passthrough = True
        data = out[0] if len(out) == 1 else b"".join(out)
        if self.strip_usage and _NULL_USAGE in data:
            data = data.replace(_NULL_USAGE, b"")
        return data

    def _route(self, events: bytes, out: list[bytes]) -> bytes:
        """Complete events: the plain ones pass as one slice, without a Python loop over
        them; only from the first event that matters to metering on, one by one. Returns
        what did not end as an event (mixed line endings can leave a piece)."""
        if not self.final_seen:
            first = min((p for p in (events.find(m) for m in _MARKERS) if p >= 0), default=-1)
            plain = len(events) if first < 0 else _last_boundary(events, first)
            if plain:
                head = events[:plain]
                if self.model is None:
                    m = _MODEL.search(head)
                    if m is not None:
                        self.model = m.group(1).decode("utf-8", "replace")
                self._keep(head)
                out.append(head)
                events = events[plain:]
        pos = 0
        for m in _BOUNDARY.finditer(events):
            self._event(events[pos : m.end()], out)
            pos = m.end()
        return events[pos:]

    def _event(self, event: bytes, out: list[bytes]) -> bool:
        """Route one complete event; False when it is not sent on right now."""
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
        if b'"usage"' in event and _HAS_USAGE.search(event):
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

    def _keep(self, events: bytes) -> None:
        """Whole events kept as they came, parsed only if the usage never comes."""
        if self.facts.usage is not None:
            return
        self._data.append(events)
        self._data_bytes += len(events)
        if self._data_bytes > _KEEP_DATA_BYTES:
            self._fold()

    def _fold(self) -> None:
        for event in (e for blob in self._data for e in _BOUNDARY.split(blob) if e):
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
