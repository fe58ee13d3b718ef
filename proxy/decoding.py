"""Decoding a compressed upstream body for metering.

The proxy asks metered calls for `Accept-Encoding: identity`; an upstream may compress
anyway. Usage is read from the decoded bytes, whatever was asked; what the client gets is
what the upstream sent (a JSON body), or its decoded events (a stream, which the proxy
may have to change: see `proxy.relay`). Decoded size is bounded: a small compressed body
cannot make the proxy hold gigabytes.
"""

from __future__ import annotations

import zlib
from typing import Protocol

MAX_DECODED_BYTES = 64 << 20


class DecodeError(ValueError):
    pass


class Decoder(Protocol):
    def decode(self, data: bytes) -> bytes: ...


class _Zlib:
    def __init__(self, encoding: str) -> None:
        # gzip: a gzip header; deflate: zlib-wrapped as the RFC says, raw as some servers do.
        wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self._obj = zlib.decompressobj(wbits)
        self._raw_fallback = encoding == "deflate"
        self._started = False
        self.total = 0

    def decode(self, data: bytes) -> bytes:
        try:
            out = self._obj.decompress(data, MAX_DECODED_BYTES - self.total + 1)
        except zlib.error:
            if self._raw_fallback and not self._started:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                self._raw_fallback = False
                return self.decode(data)
            raise DecodeError("the compressed body is corrupt") from None
        self._started = True
        self.total += len(out)
        if self.total > MAX_DECODED_BYTES or self._obj.unconsumed_tail:
            raise DecodeError(f"the body decodes to more than {MAX_DECODED_BYTES} bytes")
        return out


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._obj = brotli.Decompressor()
        self.total = 0

    def decode(self, data: bytes) -> bytes:
        try:
            out: bytes = self._obj.process(data)
        except Exception as e:  # brotli.error is not a subclass of anything common
            raise DecodeError("the compressed body is corrupt") from e
        self.total += len(out)
        if self.total > MAX_DECODED_BYTES:
            raise DecodeError(f"the body decodes to more than {MAX_DECODED_BYTES} bytes")
        return out


def decoder(content_encoding: str | None) -> Decoder | None:
    """A decoder for the body's encoding; None when it is not encoded. Raises DecodeError
    for an encoding this proxy cannot decode."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Zlib(encoding)
    if encoding == "br":
        try:
            return _Brotli()
        except ImportError:
            raise DecodeError("brotli-encoded (install Brotli to decode it)") from None
    raise DecodeError(f"encoded as {encoding!r}, which the proxy cannot decode")


def decode_all(data: bytes, content_encoding: str | None) -> bytes:
    d = decoder(content_encoding)
    return data if d is None else d.decode(data)
