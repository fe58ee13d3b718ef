"""Image sizes from the bytes a prompt carries, and image tokens by a model's rules.

A data URL's header says the image's width and height (PNG, JPEG, GIF, WebP); only the
first bytes are decoded. The token rules are the providers' published ones, selected per
model in `pricing.yaml` (`images: {rule: ...}`):

- `tiles` (OpenAI GPT-4o family): fit in 2048x2048, shortest side scaled to 768, then
  `base + tile x (512-px tiles)`; detail low is `base` alone.
- `patches` (OpenAI GPT-4.1-mini, o4-mini): 32-px patches, at most `max_patches`, times a
  multiplier.
- `pixels` (Anthropic): width x height / 750 after fitting in 1568 px and 1.15 MP.
- `gemini`: `tile` tokens per 768x768 tile (one when both sides are at most 384).

An image whose size is unknown (a remote URL, a file id) counts as the largest one the
rule allows: the reservation stays an upper bound.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass

_HEADER_BYTES = 64 * 1024  # enough for any header, even JPEG's after EXIF


def data_url_bytes(url: str) -> tuple[bytes, int] | None:
    """The first bytes of a base64 data URL's payload, and the payload's decoded size."""
    if not url.startswith("data:"):
        return None
    comma = url.find(",")
    if comma < 0 or ";base64" not in url[:comma]:
        return None
    return base64_head(url[comma + 1 :])


def base64_head(payload: str) -> tuple[bytes, int] | None:
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    head = payload[: _HEADER_BYTES * 4 // 3 // 4 * 4]
    try:
        return base64.b64decode(head, validate=False), size
    except (binascii.Error, ValueError):
        return None


def dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, WebP or JPEG from its first bytes."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return int(w), int(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", data[6:10])
            return int(w), int(h)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg(data)
    except struct.error:
        return None
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + length
    return None


@dataclass(frozen=True, slots=True)
class ImageRule:
    rule: str  # tiles | patches | pixels | gemini
    base: int = 85
    tile: int = 170
    max_patches: int = 1536
    multiplier: float = 1.0

    def tokens(self, width: int | None, height: int | None, detail: str | None) -> int:
        """Input tokens of one image; an unknown size counts as the largest possible."""
        known = width is not None and height is not None and width > 0 and height > 0
        if self.rule == "tiles":
            if detail == "low":
                return self.base
            if not known:
                return self.base + self.tile * 8  # 768 x 2048 after scaling: 2 x 4 tiles
            assert width is not None and height is not None
            w, h = _fit(width, height, 2048)
            scale = 768 / min(w, h)
            if scale < 1:
                w, h = w * scale, h * scale
            return self.base + self.tile * math.ceil(w / 512) * math.ceil(h / 512)
        if self.rule == "patches":
            if not known:
                patches = self.max_patches
            else:
                assert width is not None and height is not None
                patches = min(math.ceil(width / 32) * math.ceil(height / 32), self.max_patches)
            return math.ceil(patches * self.multiplier)
        if self.rule == "pixels":
            if not known:
                return 1600  # 1.15 MP / 750, Anthropic's largest
            assert width is not None and height is not None
            w, h = _fit(width, height, 1568)
            if w * h > 1_150_000:
                s = math.sqrt(1_150_000 / (w * h))
                w, h = w * s, h * s
            return math.ceil(w * h / 750)
        # gemini
        if not known:
            return self.tile * 16  # a large image: up to 16 tiles of 768 px per side
        assert width is not None and height is not None
        if width <= 384 and height <= 384:
            return self.tile
        return self.tile * math.ceil(width / 768) * math.ceil(height / 768)


def _fit(width: float, height: float, side: float) -> tuple[float, float]:
    scale = min(1.0, side / max(width, height))
    return width * scale, height * scale


DEFAULT_RULE = ImageRule("tiles", base=85, tile=170)
