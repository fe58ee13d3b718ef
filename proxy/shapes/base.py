"""The API-shape seam: what the proxy must know of one provider's wire format.

Each shape (OpenAI, Azure OpenAI, Anthropic Messages, Gemini) is one module implementing
`ApiShape`: which paths it serves and how each bills (`endpoint`), a request's model,
stream flag and output cap (`request`), its prompt for the worst case (`prompt`), how to
cap its output (`set_cap`) and ask a stream for usage (`ask_for_usage`), usage out of a
body (`body_facts`) or a stream (`stream_reader`), and the shape of its errors, in a body
(`error_body`) or inside a stream (`cut_event`). The call's life cycle (`proxy.call`)
knows none of it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.multipart import Form
from proxy.usage import Usage

JSONObj = dict[str, Any]


class Kind(enum.Enum):
    """How calls to an endpoint bill."""

    TOKENS = "tokens"  # LLM calls with a usage block (chat, responses, messages...)
    IMAGES = "images"  # image generation: usage tokens, or a price per image
    SPEECH = "speech"  # text to speech: per character
    TRANSCRIPTION = "transcription"  # speech to text: usage tokens, or per minute
    FREE = "free"  # no charge (listing, counting tokens, uploads, cancelling)
    UNPRICED = "unpriced"  # bills, but what cannot be known at request time


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # the ledger's endpoint, e.g. chat/completions, messages, generateContent
    kind: Kind
    body: str = "json"  # json | multipart | none: what a metered request body is
    model: str | None = None  # the model (or deployment) when the path names it
    stream: bool = False  # the path itself asks for a stream (Gemini)

    @property
    def metered(self) -> bool:
        return self.kind not in (Kind.FREE, Kind.UNPRICED)


@dataclass(frozen=True, slots=True)
class Media:
    """An image, audio or file part of a prompt: billed by rules of its own."""

    kind: str  # image | audio | file
    width: int | None = None  # pixels, when the bytes say (a data URL)
    height: int | None = None
    detail: str | None = None  # low | high | auto (OpenAI images)
    size_bytes: int | None = None  # of the data, when inline
    remote: bool = False  # a URL or file id: size unknown, reserved at the upper bound


@dataclass
class Prompt:
    """What the provider will count as input: texts for the tokenizer, tokens already
    known (per-message overheads, token arrays), and media parts."""

    texts: list[str] = field(default_factory=list)
    fixed_tokens: int = 0
    media: list[Media] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)


@dataclass
class RequestFacts:
    model: str | None = None
    stream: bool = False
    cap: int | None = None  # the output cap the request sets (tokens), before x n
    choices: int = 1  # n / best_of: outputs the cap applies to
    service_tier: str | None = None
    background: bool = False
    previous_response_id: str | None = None  # input the request does not show
    conversation: str | None = None
    end_user: str | None = None  # the end user the body names (user, metadata.user_id)
    units: int = 1  # images asked for, characters to speak, seconds of audio (a bound)
    size: str | None = None  # images: size/quality, the key of a per-image price
    input_images: int = 0  # images sent to be edited


@dataclass(slots=True)
class BodyFacts:
    """What a complete body, or a stream's final event, tells about the call."""

    usage: Usage | None = None
    usage_error: str | None = None
    model: str | None = None
    service_tier: str | None = None
    response_id: str | None = None
    status: str | None = None  # Responses: queued, in_progress, completed...
    units: int | None = None  # images generated, seconds transcribed...


class Verdict(enum.Enum):
    SEND = 1  # pass it on now
    DROP = 2  # the usage chunk the proxy asked for on the client's behalf
    FINAL = 3  # the stream's end: held until the ledger row is committed


class Marked:
    """A reader's markers: the bytes that only events that matter to metering contain
    (a usage object, the final event). Everything else is passed on unparsed."""

    markers: tuple[bytes, ...] = ()

    def has_marker(self, data: bytes) -> bool:
        # Runs for every chunk of every stream: a plain loop, since a generator passed to
        # any() costs half as much again.
        for marker in self.markers:  # noqa: SIM110
            if marker in data:
                return True
        return False

    def first_marker(self, data: bytes) -> int:
        """Where the first marker in `data` starts (-1: none)."""
        found = [p for marker in self.markers if (p := data.find(marker)) >= 0]
        return min(found) if found else -1

    def plain_text(self, payload: bytes) -> str | None:
        """The generated text of an event's data, read without parsing it, where the
        reader knows its usual shape; None: parse it."""
        return None


class StreamReader(Protocol):
    """One stream's events, read for metering. `event()` sees every event that has one
    of the reader's markers (and every event when output is being counted)."""

    facts: BodyFacts
    model: str | None

    def has_marker(self, data: bytes) -> bool:
        """Whether any event in `data` can matter to metering: cheap, runs per chunk."""

    def first_marker(self, data: bytes) -> int:
        """Where the first byte that can matter to metering is (-1: none)."""

    def sniff_model(self, data: bytes) -> None:
        """Find the model in events that are passed on unparsed."""

    def event(self, raw: bytes, obj: Any) -> Verdict:
        """One complete event (`obj` its parsed data, or None)."""

    def texts(self, obj: Any) -> Iterable[str]:
        """The generated text in an event, for counting output tokens."""

    def plain_text(self, payload: bytes) -> str | None:
        """The generated text of an event's data (`texts()` of it), read without parsing
        it when the event has the usual shape; None: parse it and ask `texts()`."""

    def rewrite(self, data: bytes) -> bytes:
        """Bytes as the client would have had them (e.g. without `"usage":null`)."""

    def oversize(self, head: bytes, tail: bytes) -> Verdict:
        """An event too big to parse: judged from its first and last bytes."""


class ApiShape(Protocol):
    name: str  # the provider family: openai, azure, anthropic, gemini
    # Headers a client may carry its key in: read for proxy keys, replaced upstream.
    credential_headers: frozenset[str]

    def endpoint(self, tail: str, method: str) -> Endpoint | None:
        """The endpoint a canonical path serves (None: not this shape's)."""

    def request(self, ep: Endpoint, body: JSONObj) -> RequestFacts: ...

    def prompt(self, ep: Endpoint, body: JSONObj) -> Prompt: ...

    def form_request(self, ep: Endpoint, form: Form) -> tuple[RequestFacts, Prompt]:
        """A multipart request (image edits, transcriptions): its facts and prompt."""

    def set_cap(self, ep: Endpoint, body: JSONObj, tokens: int) -> JSONObj:
        """The body with its output capped at `tokens` (clamp)."""

    def ask_for_usage(self, ep: Endpoint, body: JSONObj) -> JSONObj | None:
        """The body asking a stream for usage it would not carry, or None if it will."""

    def body_facts(self, ep: Endpoint, obj: Any) -> BodyFacts: ...

    def output_texts(self, ep: Endpoint, obj: Any) -> Iterator[str]:
        """Generated text in a complete body, for estimating output tokens."""

    def stream_reader(self, ep: Endpoint, strip_usage: bool) -> StreamReader: ...

    def error_body(self, status: int, type_: str, code: str, message: str,
                   param: str | None) -> bytes:  # fmt: skip
        """The body a client of this shape expects for an error the proxy answers."""

    def cut_event(self, ep: Endpoint, type_: str, code: str, message: str) -> bytes:
        """What ends a stream the proxy cuts: an error event the SDKs raise, then the
        stream's normal terminator."""

    def upstream_error_message(self, obj: Any) -> str | None:
        """The message of an error body from the upstream."""

    def upstream_url(self, base_url: str, prefix: str, path: str, query: str) -> str:
        """Where the call goes: the upstream's base URL and the canonical path."""

    def credentials(self, api_key: str) -> dict[str, str]:
        """The header(s) that carry an upstream key configured in the proxy."""
