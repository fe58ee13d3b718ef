"""Relaying a server-sent-event stream while metering it: SSE framing, with bounds.

`StreamMeter.feed()` takes bytes as they arrive and returns the bytes to send on: complete
events, unchanged, except what the shape's reader (`proxy.shapes`) says: the usage chunk
the proxy asked for on the client's behalf is dropped, and the final event (`[DONE]`,
`response.completed`, `message_stop`...) is held back until the call's ledger row is
committed. A partial event waits for its end: an SSE client cannot use half an event.

Memory per stream is bounded whatever the upstream sends:
- an event larger than `MAX_EVENT_BYTES` is passed on as it arrives, unparsed, but its
  first and last bytes are kept, so the reader can still tell a final event and find its
  usage (which sits at the end of a Responses final event, after echoed instructions);
- after the final event at most `AFTER_FINAL_BYTES` more are kept (`overflow` says the
  upstream sent more: the relay stops reading and cuts);
- text kept for estimating output, when no usage comes, is capped; beyond it characters
  are counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from proxy.shapes.base import StreamReader, Verdict

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")
MAX_EVENT_BYTES = 16 << 20  # far above real final events (a few MB with long instructions)
_HEAD_BYTES = 4096  # of an event too large to parse: its type is at the start...
_TAIL_BYTES = 256 * 1024  # ...and its usage at the end
AFTER_FINAL_BYTES = 64 * 1024  # what may follow the final event (a comment, padding)
# Events kept whole for an estimate (needed only if the usage never comes): folded into
# their text past this, since a thousand open streams would hold it each.
_KEEP_DATA_BYTES = 8 * 1024
_KEEP_TEXT_CHARS = 256 * 1024  # generated text kept for tiktoken; beyond: 4 chars a token
_JOIN_TEXTS = 64  # pieces of kept text joined into one string past this many


def _payload(event: bytes) -> bytes:
    """The `data:` lines of one event, joined as the SSE spec says."""
    lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def _events(blob: bytes) -> list[bytes]:
    """Whole events, without their separators."""
    if b"\r" in blob:
        return [e for e in _BOUNDARY.split(blob) if e]
    events = blob.split(b"\n\n")
    if not events[-1]:
        events.pop()
    return events


def _last_boundary(buf: bytes, limit: int) -> int:
    """The end of the last complete event in buf[:limit] (0: none)."""
    if b"\r" not in buf:  # the usual stream: one separator to look for, not three
        p = buf.rfind(b"\n\n", 0, limit)
        return p + 2 if p >= 0 else 0
    return max(
        (p + len(sep) for sep in _SEPARATORS if (p := buf.rfind(sep, 0, limit)) >= 0), default=0
    )


def _first_boundary(buf: bytes, start: int) -> int:
    """The end of the first event boundary at or after `start` (-1: none)."""
    m = _BOUNDARY.search(buf, start)
    return m.end() if m else -1


def _json(payload: bytes) -> Any:
    if payload == b"[DONE]":  # not JSON: the error orjson raises costs more than the parse
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


class StreamMeter:
    def __init__(self, reader: StreamReader, *, count_output: bool = False) -> None:
        self.reader = reader
        # Count output as it flows (a stream budget): every event is parsed for its text.
        self.count_output = count_output
        self.final_seen = False
        self.after_final = 0  # bytes received after the final event
        self.overflow = False  # more than AFTER_FINAL_BYTES of them: stop reading, cut
        self._tail = b""
        self._held: list[bytes] = []
        self._big_head: bytes | None = None  # an event too large to parse is passing
        self._big_carry = b""  # its last bytes, not sent yet
        self._data: list[bytes] = []
        self._data_bytes = 0
        self.texts: list[str] = []
        self._text_chars = 0
        self.overflow_chars = 0  # generated characters beyond what is kept for tiktoken
        self.fresh: list[str] = []  # generated text since the stream budget last looked

    @property
    def facts(self) -> Any:
        return self.reader.facts

    @property
    def model(self) -> str | None:
        return self.reader.model

    @property
    def passthrough(self) -> bool:
        """An event too large to parse is being passed on."""
        return self._big_head is not None

    def feed(self, chunk: bytes) -> bytes:
        if self.final_seen:
            self._after(chunk)
            return b""
        if self._big_head is not None:
            return self._feed_big(chunk)
        reader = self.reader
        if not self._tail and chunk.endswith(_SEPARATORS) and not reader.has_marker(chunk):
            # Whole events, none of which matters to metering: most chunks of any stream.
            reader.sniff_model(chunk)
            if self.count_output:
                self._count_texts(_events(chunk))
            else:
                self._keep(chunk)
            return reader.rewrite(chunk)
        buf = self._tail + chunk if self._tail else chunk
        end = _last_boundary(buf, len(buf))
        out: list[bytes] = []
        self._tail = (self._route(buf[:end], out) if end else b"") + buf[end:]
        if self._final() and self._tail:  # what follows the final event, in order
            self._after(self._tail)
            self._tail = b""
        elif len(self._tail) > MAX_EVENT_BYTES:
            out.append(self._start_big(self._tail))
            self._tail = b""
        data = out[0] if len(out) == 1 else b"".join(out)
        return reader.rewrite(data)

    def _final(self) -> bool:
        """Whether the final event has been seen (routing may have just seen it)."""
        return self.final_seen

    def _route(self, events: bytes, out: list[bytes]) -> bytes:
        """Complete events: the plain ones pass as one slice, without a Python loop over
        them; only from the first event that matters to metering on, one by one. Returns
        what did not end as an event (mixed line endings can leave a piece)."""
        if not self.final_seen:
            reader = self.reader
            marker = reader.first_marker(events)
            plain = len(events) if marker < 0 else _last_boundary(events, marker)
            if plain:
                head = events[:plain]
                reader.sniff_model(head)
                if self.count_output:
                    self._count_texts(_events(head))
                else:
                    self._keep(head)
                out.append(head)
                events = events[plain:]
        pos = 0
        for m in _BOUNDARY.finditer(events):
            self._event(events[pos : m.end()], out)
            pos = m.end()
        return events[pos:]

    def _event(self, event: bytes, out: list[bytes]) -> None:
        if self.final_seen:
            self._after(event)
            return
        obj = _json(_payload(event))
        verdict = self.reader.event(event, obj)
        if verdict is Verdict.FINAL:
            self.final_seen = True
            self._held.append(event)
            return
        if self.count_output and obj is not None:
            self._take_texts(obj)
        elif verdict is Verdict.SEND:
            self._keep(event)
        if verdict is Verdict.SEND:
            out.append(event)

    def _count_texts(self, events: Iterable[bytes]) -> None:
        """The generated text of plain events: for a stream budget, and kept for an
        estimate (the common case of `_event`, without its per-event routing)."""
        reader = self.reader
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payload = event[6:]
            else:
                payload = _payload(event)
            text = reader.plain_text(payload)
            if text is None:
                self._take_texts(_json(payload))
            else:
                self._text(text)

    def _take_texts(self, obj: Any) -> None:
        for text in self.reader.texts(obj):
            self._text(text)

    def _after(self, data: bytes) -> None:
        self.after_final += len(data)
        if self.after_final > AFTER_FINAL_BYTES:
            self.overflow = True
        elif data:
            self._held.append(data)

    # -- an event too large to parse -----------------------------------------------------

    def _start_big(self, data: bytes) -> bytes:
        self._big_head = data[:_HEAD_BYTES]
        self._big_carry = data[-_TAIL_BYTES:]
        return data[:-_TAIL_BYTES]

    def _feed_big(self, chunk: bytes) -> bytes:
        assert self._big_head is not None
        data = self._big_carry + chunk
        end = _first_boundary(data, max(len(self._big_carry) - 3, 0))
        if end < 0:
            self._big_carry = data[-_TAIL_BYTES:]
            return data[:-_TAIL_BYTES]
        piece, rest = data[:end], data[end:]
        verdict = self.reader.oversize(self._big_head, piece[-_TAIL_BYTES:])
        self._big_head, self._big_carry = None, b""
        if verdict is Verdict.FINAL:
            self.final_seen = True
            self._held.append(piece)
            self._after(rest)
            return b""
        return piece + (self.feed(rest) if rest else b"")

    # -- text for estimates --------------------------------------------------------------

    def _keep(self, events: bytes) -> None:
        """Whole events kept as they came, parsed only if the usage never comes."""
        if self.reader.facts.usage is not None:
            return
        self._data.append(events)
        self._data_bytes += len(events)
        if self._data_bytes > _KEEP_DATA_BYTES:
            self._fold()

    def _text(self, text: str) -> None:
        """A piece of generated text: fresh for a stream budget, kept for an estimate."""
        if self.count_output:
            self.fresh.append(text)
        if self._text_chars < _KEEP_TEXT_CHARS:
            texts = self.texts
            texts.append(text)
            self._text_chars += len(text)
            if len(texts) > _JOIN_TEXTS:
                # A token a piece: thousands of tiny strings per stream otherwise
                # (10 KB of objects for 2 KB of text).
                texts[:] = ["".join(texts)]
        else:
            self.overflow_chars += len(text)

    def _fold(self) -> None:
        for blob in self._data:
            self._count_texts(_events(blob))
        self._data.clear()
        self._data_bytes = 0

    def generated_texts(self) -> list[str]:
        """What the stream generated so far, for estimating output tokens."""
        self._fold()
        return self.texts

    def take_fresh(self) -> list[str]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def finish(self) -> bytes:
        """Everything held back (final event, partial tail): send after the commit."""
        held = b"".join(self._held) + self._tail + self._big_carry
        self._held.clear()
        self._tail = b""
        self._big_carry = b""
        return self.reader.rewrite(held)
