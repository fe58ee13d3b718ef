"""Pieces every shape's prompt reader uses: tool schemas as compact JSON, media parts."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.images import base64_head, data_url_bytes, dimensions
from proxy.shapes.base import Media


def compact_json(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return str(value)


def media_of_url(url: str | None, detail: Any = None) -> Media:
    """An image given by URL: its size read from a data URL, else unknown (remote)."""
    d = detail if isinstance(detail, str) else None
    if url is not None:
        head = data_url_bytes(url)
        if head is not None:
            data, size = head
            dims = dimensions(data)
            if dims is not None:
                return Media("image", dims[0], dims[1], d, size)
            return Media("image", detail=d, size_bytes=size)
    return Media("image", detail=d, remote=True)


def media_of_base64(kind: str, mime: str | None, data: Any) -> Media:
    """Inline base64 data with a MIME type (Anthropic, Gemini)."""
    if not isinstance(data, str):
        return Media(kind, remote=True)
    head = base64_head(data)
    if head is None:
        return Media(kind, remote=True)
    raw, size = head
    if kind == "image" or (mime or "").startswith("image/"):
        dims = dimensions(raw)
        if dims is not None:
            return Media("image", dims[0], dims[1], None, size)
        return Media("image", size_bytes=size)
    return Media(kind, size_bytes=size)
