"""Token usage: the `Usage` record every API shape's usage block becomes, and the checks a
provider's numbers must pass before they are priced. Pure; no I/O. (Each shape reads its
own wire format: `proxy.shapes`.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.bounds import MAX_TOKENS

PROVIDER = "provider"
ESTIMATED = "estimated"
REPORTED = "reported"
NONE = "none"  # nothing was generated: refused, upstream error, unmetered endpoint


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # all input tokens, cached and cache-written ones included
    cached_input_tokens: int = 0
    output_tokens: int = 0  # all output tokens, reasoning ones included (as OpenAI counts)
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0  # all cache writes, 1-hour ones included
    service_tier: str | None = None
    source: str = NONE
    cache_write_1h_tokens: int = 0  # Anthropic's 1-hour cache writes, priced apart
    image_input_tokens: int = 0  # image tokens in the input (gpt-image), priced apart
    audio_input_tokens: int = 0  # audio tokens in the input (transcription), priced apart

    def check(self) -> None:
        """Raise InvalidUsage when the parts do not fit in the wholes."""
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            raise InvalidUsage(
                f"cached ({self.cached_input_tokens}) + cache-write ({self.cache_write_tokens})"
                f" input tokens exceed input tokens ({self.input_tokens})"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise InvalidUsage(
                f"reasoning tokens ({self.reasoning_tokens}) exceed output tokens"
                f" ({self.output_tokens})"
            )
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            raise InvalidUsage(
                f"1-hour cache writes ({self.cache_write_1h_tokens}) exceed cache writes"
                f" ({self.cache_write_tokens})"
            )
        media = self.image_input_tokens + self.audio_input_tokens
        if media > self.input_tokens - self.cached_input_tokens:
            raise InvalidUsage(
                f"image and audio input tokens ({media}) exceed uncached input tokens"
                f" ({self.input_tokens - self.cached_input_tokens})"
            )
        for name in ("input_tokens", "output_tokens"):
            if getattr(self, name) > MAX_TOKENS:
                raise InvalidUsage(f"{name}={getattr(self, name)} is more than {MAX_TOKENS:,}")


class InvalidUsage(ValueError):
    """The provider sent a usage block that cannot be true (negative, not a number...)."""


def count(obj: Any, key: str, where: str = "") -> int:
    """A token count from a usage object: absent is 0; anything but a whole number in
    [0, MAX_TOKENS] is refused, naming the field."""
    if not isinstance(obj, dict):
        return 0
    value = obj.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidUsage(f"{where}{key}={value!r} is not a whole number")
    if value < 0:
        raise InvalidUsage(f"{where}{key}={value} is negative")
    if value > MAX_TOKENS:
        raise InvalidUsage(f"{where}{key}={value} is more than {MAX_TOKENS:,} tokens")
    return value
