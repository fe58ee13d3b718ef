"""Image sizes from the first bytes of a data URL, and image tokens by each provider's rule."""

from __future__ import annotations

import base64
import struct

import pytest

from proxy.images import ImageRule, data_url_bytes, dimensions

PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 1000, 2600)
GIF = b"GIF89a" + struct.pack("<HH", 640, 480)
JPEG = (b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
        + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 768, 1024))  # fmt: skip
WEBP = (
    b"RIFF\x00\x00\x00\x00WEBPVP8X"
    + b"\x00" * 8
    + (799).to_bytes(3, "little")
    + (599).to_bytes(3, "little")
)


@pytest.mark.parametrize(("data", "size"), [(PNG, (1000, 2600)), (GIF, (640, 480)),
                                            (JPEG, (1024, 768)), (WEBP, (800, 600)),
                                            (b"not an image", None)])  # fmt: skip
def test_dimensions_from_headers(data: bytes, size: tuple[int, int] | None) -> None:
    url = "data:image/x;base64," + base64.b64encode(data + b"\x00" * 100).decode()
    head = data_url_bytes(url)
    assert head is not None and dimensions(head[0]) == size


def test_openai_tiles() -> None:
    mini = ImageRule("tiles", base=2833, tile=5667)
    # 1000 x 2600 -> fits 2048: 788 x 2048 -> shortest 768: 768 x 1997 -> 2 x 4 tiles
    assert mini.tokens(1000, 2600, "high") == 2833 + 8 * 5667 == 48_169
    assert mini.tokens(1000, 2600, "low") == 2833
    assert mini.tokens(None, None, "auto") == 48_169  # unknown: the largest possible
    assert ImageRule("tiles").tokens(512, 512, None) == 85 + 170


def test_patches_pixels_and_gemini() -> None:
    assert ImageRule("patches", multiplier=1.62).tokens(1024, 1024, None) == 1659  # 1024 x 1.62
    assert ImageRule("patches").tokens(4000, 4000, None) == 1536  # capped
    assert ImageRule("pixels").tokens(1000, 1000, None) == 1334  # 1,000,000 / 750
    assert ImageRule("pixels").tokens(None, None, None) == 1600
    assert ImageRule("gemini", tile=258).tokens(300, 300, None) == 258
    assert ImageRule("gemini", tile=258).tokens(1600, 800, None) == 258 * 3 * 2
