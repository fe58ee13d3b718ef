"""The price table (`pricing.yaml`): parsing, validation, model resolution and cost.

Prices in the file are USD per 1M tokens. Internally a rate is pico-USD per token (an int),
so a cost is an exact integer; see `proxy.money`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from proxy.bounds import MAX_PRICE_PER_M, MAX_TOKENS, MAX_UNIT_PRICE
from proxy.images import ImageRule
from proxy.money import PICO_PER_USD
from proxy.schema import FieldError, Section, decimal_places, yaml_line
from proxy.usage import Usage

_PICO_PER_TOKEN_PER_USD_PER_M = PICO_PER_USD // 10**6
SERVICE_TIERS = ("priority", "flex")
_RATE_KEYS = ("input", "cached_input", "output", "reasoning", "cache_write", "cache_write_1h",
              "image_input", "audio_input")  # fmt: skip
_UNIT_KEYS = ("per_image", "per_million_chars", "per_minute")
_MODEL_KEYS = (*_RATE_KEYS, *_UNIT_KEYS, "max_output", "aliases", "long_context", "note",
               "context_window", "hidden_reasoning", "images", "image_output_tokens",
               *SERVICE_TIERS)  # fmt: skip

# Suffixes a provider appends to pin a snapshot: -2024-08-06, -20250929, -0613, @20251001.
_DATE_SUFFIX = re.compile(r"(?:[-@]\d{4}-\d{2}-\d{2}|[-@]\d{8}|-\d{4})$")


class PricingError(Exception):
    """The price file cannot be used; `str()` is one line naming file, line, key and value."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True, slots=True)
class Rates:
    """pico-USD per token."""

    input: int
    cached_input: int
    output: int
    reasoning: int
    cache_write: int
    cache_write_1h: int = 0  # Anthropic's 1-hour cache writes
    image_input: int = 0  # image tokens in the input (gpt-image models)
    audio_input: int = 0  # audio tokens in the input (transcription, audio models)

    @property
    def dearest_input(self) -> int:
        """What an input token can cost at most: every one written to a cache, say."""
        return max(self.input, self.cache_write, self.cache_write_1h, self.image_input,
                   self.audio_input)  # fmt: skip

    @property
    def dearest_output(self) -> int:
        return max(self.output, self.reasoning)


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """Prices of what is not counted in tokens, in pico-USD."""

    per_image: dict[str, int] = field(default_factory=dict)  # "1024x1024/hd" (or "*") -> pico
    image_output_tokens: dict[str, int] = field(default_factory=dict)  # same keys -> tokens
    per_char: int | None = None  # text to speech
    per_minute: int | None = None  # speech to text

    def image(self, size: str | None) -> int | None:
        return _by_size(self.per_image, size)

    def image_tokens(self, size: str | None) -> int | None:
        return _by_size(self.image_output_tokens, size)


def _by_size(table: dict[str, int], size: str | None) -> int | None:
    """`1024x1024/hd` -> its entry; `.../auto` -> the dearest of that size; else `*`."""
    if not table:
        return None
    if size in table:
        return table[size]
    dims = (size or "").split("/", 1)[0]
    same = [v for k, v in table.items() if k.split("/", 1)[0] == dims]
    if same:
        return max(same)
    return table.get("*", max(table.values()))


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str
    provider: str
    rates: Rates
    tiers: dict[str, Rates] = field(default_factory=dict)
    long_context_above: int | None = None
    long_context: Rates | None = None
    max_output: int | None = None
    context_window: int | None = None  # what a chain the proxy did not see may hold
    hidden_reasoning: bool = False  # reasons in tokens a stream never shows
    image_rule: ImageRule | None = None  # how images in a prompt count as tokens
    units: UnitPrices = field(default_factory=UnitPrices)

    def rates_for(self, service_tier: str | None, input_tokens: int) -> Rates:
        if service_tier in self.tiers:
            return self.tiers[service_tier]
        if self.long_context is not None and input_tokens > (self.long_context_above or 0):
            return self.long_context
        return self.rates

    def cost(self, usage: Usage) -> int:
        """Exact cost in pico-USD; reasoning tokens are part of output tokens, 1-hour cache
        writes part of cache writes, image and audio input tokens part of uncached input."""
        r = self.rates_for(usage.service_tier, usage.input_tokens)
        uncached = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
        media = min(usage.image_input_tokens + usage.audio_input_tokens, uncached)
        visible_output = max(usage.output_tokens - usage.reasoning_tokens, 0)
        write_1h = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
        return (
            (uncached - media) * r.input
            + usage.image_input_tokens * (r.image_input or r.input)
            + usage.audio_input_tokens * (r.audio_input or r.input)
            + usage.cached_input_tokens * r.cached_input
            + (usage.cache_write_tokens - write_1h) * r.cache_write
            + write_1h * (r.cache_write_1h or r.cache_write)
            + visible_output * r.output
            + usage.reasoning_tokens * r.reasoning
        )

    def unit_cost(self, kind: str, units: int, size: str | None = None) -> int | None:
        """What `units` cost when they are not tokens: images (by size), characters of
        speech, seconds of audio (per-minute prices, to the nearest pico-dollar). None: no
        such price."""
        u = self.units
        if kind == "images" and (per_image := u.image(size)) is not None:
            return per_image * units
        if kind == "speech" and u.per_char is not None:
            return u.per_char * units
        if kind == "transcription" and u.per_minute is not None:
            return (u.per_minute * units + 30) // 60
        return None

    def worst_case(self, input_tokens: int, output_tokens: int) -> int:
        """The most a call can cost: no cache discount, the dearest applicable tier."""
        candidates = [self.rates, *self.tiers.values()]
        if self.long_context is not None and input_tokens > (self.long_context_above or 0):
            candidates.append(self.long_context)
        return max(
            input_tokens * max(r.input, r.cache_write) + output_tokens * max(r.output, r.reasoning)
            for r in candidates
        )


@dataclass(frozen=True)
class PriceTable:
    version: str
    updated: str
    models: dict[str, ModelPrice]
    aliases: dict[str, str]
    sources: dict[str, str]
    _cache: dict[str, ModelPrice | None] = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, model: str) -> ModelPrice | None:
        """exact -> alias -> provider prefix stripped -> date suffix stripped -> None."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = self._resolve(model)
        if len(self._cache) < 10_000:  # model names come from clients: keep the memo bounded
            self._cache[model] = found
        return found

    def _lookup(self, name: str) -> ModelPrice | None:
        price = self.models.get(name)
        if price is None and name in self.aliases:
            price = self.models[self.aliases[name]]
        return price

    def _resolve(self, model: str) -> ModelPrice | None:
        candidates = [model]
        if "/" in model:
            candidates.append(model.split("/", 1)[1])
        for name in candidates:
            price = self._lookup(name)
            if price is not None:
                return price
        for name in candidates:
            stripped = _DATE_SUFFIX.sub("", name)
            if stripped != name:
                price = self._lookup(stripped)
                if price is not None:
                    return price
        return None


def _rate(section: Section, key: str, default: int | None) -> int:
    if not section.has(key):
        if default is None:
            section.fail(key, "is required (USD per 1M tokens)")
        return default
    amount: Decimal = section.usd(key)
    if 0 < amount < Decimal("0.001"):
        per_million = amount * 10**6
        section.fail(
            key,
            "looks like a price per token; pricing.yaml is in USD per 1M tokens"
            f" (did you mean {per_million.normalize():f}?)",
        )
    if amount > MAX_PRICE_PER_M:
        section.fail(key, f"is more than ${MAX_PRICE_PER_M:,} per 1M tokens; is it a typo?")
    if decimal_places(amount) > 6:
        section.fail(key, "has more than 6 decimal places (USD per 1M tokens)")
    return int(amount * _PICO_PER_TOKEN_PER_USD_PER_M)


def _rates(section: Section, base: Rates | None = None, unit_priced: bool = False) -> Rates:
    missing = 0 if unit_priced else None  # a model priced per unit needs no token price
    input_rate = _rate(section, "input", base.input if base else missing)
    output_rate = _rate(section, "output", base.output if base else missing)
    # Within a tier or long-context section, the usual defaults follow that section's own
    # input and output prices; what only some models have follows the model's.
    return Rates(
        input=input_rate,
        cached_input=_rate(section, "cached_input", input_rate),
        output=output_rate,
        reasoning=_rate(section, "reasoning", output_rate),
        cache_write=_rate(section, "cache_write", input_rate),
        cache_write_1h=_rate(section, "cache_write_1h", base.cache_write_1h if base else 0),
        image_input=_rate(section, "image_input", base.image_input if base else 0),
        audio_input=_rate(section, "audio_input", base.audio_input if base else 0),
    )


def _unit(section: Section, key: str, scale: int) -> int:
    """A unit price in USD (per image, per minute) or USD per 1M characters, as pico-USD
    per unit (scale 10^12) or per character (10^6)."""
    amount: Decimal = section.usd(key, max=MAX_UNIT_PRICE)
    if decimal_places(amount) > 6:
        section.fail(key, "has more than 6 decimal places")
    return int(amount * scale)


def _units(s: Section) -> UnitPrices:
    per_image = {}
    if s.has("per_image"):
        images = s.section("per_image")
        per_image = {str(k): _unit(images, str(k), PICO_PER_USD) for k in images.data}
    tokens = {}
    if s.has("image_output_tokens"):
        t = s.section("image_output_tokens")
        tokens = {str(k): t.integer(str(k), min=0, max=MAX_TOKENS) for k in t.data}
    return UnitPrices(
        per_image=per_image,
        image_output_tokens=tokens,
        per_char=_unit(s, "per_million_chars", 10**6) if s.has("per_million_chars") else None,
        per_minute=_unit(s, "per_minute", PICO_PER_USD) if s.has("per_minute") else None,
    )


def _image_rule(s: Section) -> ImageRule | None:
    if not s.has("images"):
        return None
    i = s.section("images")
    i.check_unknown(("rule", "base", "tile", "max_patches", "multiplier"))
    return ImageRule(
        i.choice("rule", ("tiles", "patches", "pixels", "gemini")),
        base=i.integer("base", 85, min=0, max=MAX_TOKENS),
        tile=i.integer("tile", 170, min=0, max=MAX_TOKENS),
        max_patches=i.integer("max_patches", 1536, min=1, max=MAX_TOKENS),
        multiplier=i.number("multiplier", 1.0, min=0, max=100),
    )


def _model(name: str, provider: str, s: Section) -> tuple[ModelPrice, list[str]]:
    s.check_unknown(_MODEL_KEYS)
    rates = _rates(s, unit_priced=any(s.has(k) for k in _UNIT_KEYS))
    tiers = {}
    for tier in SERVICE_TIERS:
        if s.has(tier):
            tier_section = s.section(tier)
            tier_section.check_unknown(_RATE_KEYS)
            tiers[tier] = _rates(tier_section, rates)
    above = None
    long_rates = None
    if s.has("long_context"):
        lc = s.section("long_context")
        lc.check_unknown(("above_tokens", *_RATE_KEYS))
        above = lc.integer("above_tokens", min=1, max=MAX_TOKENS)
        long_rates = _rates(lc, rates)
    max_output = s.integer("max_output", None, min=1, max=MAX_TOKENS)
    price = ModelPrice(
        name, provider, rates, tiers, above, long_rates, max_output,
        context_window=s.integer("context_window", None, min=1, max=MAX_TOKENS),
        hidden_reasoning=s.boolean("hidden_reasoning", False),
        image_rule=_image_rule(s),
        units=_units(s),
    )  # fmt: skip
    return price, s.strings("aliases")


def parse_price_table(text: str, path: Path | str = "pricing.yaml") -> PriceTable:
    """Parse and validate; raises PricingError naming file, line, key and value."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PricingError(path, f"not valid YAML: {problem}", line) from None
    try:
        return _build(data, text)
    except FieldError as e:
        raise PricingError(path, e.describe(), yaml_line(text, e.parts)) from None


def _build(data: Any, text: str) -> PriceTable:
    top = Section(data)
    top.check_unknown(("updated", "providers", "note"))
    updated = top.data.get("updated")
    if updated is None:
        top.fail("updated", "is required (the date the prices were checked, YYYY-MM-DD)")
    updated = str(updated)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", updated):
        top.fail("updated", "must be a date YYYY-MM-DD")
    providers = top.section("providers")
    models: dict[str, ModelPrice] = {}
    aliases: dict[str, str] = {}
    sources: dict[str, str] = {}
    for provider in providers.data:
        p = providers.section(provider)
        p.check_unknown(("source", "models", "note"))
        sources[provider] = p.string("source")
        ms = p.section("models")
        for name in ms.data:
            price, names = _model(str(name), str(provider), ms.section(name))
            if price.name in models or price.name in aliases:
                ms.fail(
                    name, f"model is defined twice (also under {_owner(models, aliases, name)})"
                )
            models[price.name] = price
            for alias in names:
                if alias in models or alias in aliases:
                    ms.section(name).fail("aliases", f"alias {alias!r} is already taken")
                aliases[alias] = price.name
    for alias in list(aliases):
        if alias in models:
            raise FieldError(alias, alias, "is both a model and an alias")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return PriceTable(f"{updated}+{digest}", updated, models, aliases, sources)


def _owner(models: dict[str, ModelPrice], aliases: dict[str, str], name: str) -> str:
    if name in models:
        return f"provider {models[name].provider}"
    return f"an alias of {aliases[name]}"


def load_price_table(path: Path) -> PriceTable:
    """Blocking file read: call at startup or from a thread."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PricingError(path, f"cannot read: {e.strerror}") from None
    return parse_price_table(text, path)


def bundled_pricing_path() -> Path:
    return Path(__file__).parent / "data" / "pricing.yaml"
