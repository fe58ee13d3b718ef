"""The API shapes by provider name: a plain dict, one entry per module."""

from __future__ import annotations

from proxy.shapes.anthropic import AnthropicShape
from proxy.shapes.azure import AzureShape
from proxy.shapes.base import ApiShape
from proxy.shapes.gemini import GeminiShape
from proxy.shapes.openai import OpenAIShape

SHAPES: dict[str, ApiShape] = {
    "openai": OpenAIShape(),
    "azure": AzureShape(),
    "anthropic": AnthropicShape(),
    "gemini": GeminiShape(),
}
