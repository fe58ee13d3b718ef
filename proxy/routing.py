"""Which API shape a request speaks, which endpoint it calls, and which upstream serves it.

The path prefix says most: `/v1beta/` and `/upload/` are Gemini's, `/openai/` is Azure
OpenAI's. Under `/v1/`, `messages` is Anthropic's and `models/{m}:action` Gemini's; any
other `/v1/` path is OpenAI's, unless the client's headers say which SDK sent it
(`anthropic-version`, `x-goog-api-key`): the Anthropic SDK lists models at `/v1/models`
too. The upstream is the first of that provider whose model globs match, else its default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.paths import canonical
from proxy.shapes.base import ApiShape, Endpoint
from proxy.shapes.registry import SHAPES

_GEMINI_ACTION = re.compile(r"models/[^/]+:[A-Za-z]+")


@dataclass(frozen=True, slots=True)
class Route:
    shape: ApiShape
    endpoint: Endpoint
    prefix: str  # v1, v1beta, openai, upload
    path: str  # the canonical path after the prefix, decoded
    upstream_path: str  # the same, percent-encoded, as the upstream gets it


def provider_of(prefix: str, path: str, headers: CIMultiDictProxy[str]) -> str:
    if prefix in ("v1beta", "upload"):
        return "gemini"
    if prefix == "openai":
        return "azure"
    low = path.lower()
    if low == "messages" or low.startswith("messages/") or low == "complete":
        return "anthropic"
    if _GEMINI_ACTION.fullmatch(path):
        return "gemini"
    if "anthropic-version" in headers:
        return "anthropic"
    if "x-goog-api-key" in headers:
        return "gemini"
    return "openai"


def route(prefix: str, raw_tail: str, method: str, headers: CIMultiDictProxy[str]) -> Route:
    """Raises ProxyFault 400 for a path that cannot be made canonical."""
    path, encoded = canonical(raw_tail)
    provider = provider_of(prefix, path, headers)
    shape = SHAPES[provider]
    endpoint = shape.endpoint(path, method)
    assert endpoint is not None  # every shape classifies every path of its own
    return Route(shape, endpoint, prefix, path, encoded)
