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

from proxy.bounds import MAX_PRICE_PER_M, MAX_TOKENS
from proxy.money import PICO_PER_USD
from proxy.schema import FieldError, Section, decimal_places, yaml_line
from proxy.usage import Usage

_PICO_PER_TOKEN_PER_USD_PER_M = PICO_PER_USD // 10**6
SERVICE_TIERS = ("priority", "flex")
_RATE_KEYS = ("input", "cached_input", "output", "reasoning", "cache_write")
_MODEL_KEYS = (*_RATE_KEYS, "max_output", "aliases", "long_context", "note", *SERVICE_TIERS)

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


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str
    provider: str
    rates: Rates
    tiers: dict[str, Rates] = field(default_factory=dict)
    long_context_above: int | None = None
    long_context: Rates | None = None
    max_output: int | None = None

    def rates_for(self, service_tier: str | None, input_tokens: int) -> Rates:
        if service_tier in self.tiers:
            return self.tiers[service_tier]
        if self.long_context is not None and input_tokens > (self.long_context_above or 0):
            return self.long_context
        return self.rates

    def cost(self, usage: Usage) -> int:
        """Exact cost in pico-USD; reasoning tokens are part of output tokens."""
        r = self.rates_for(usage.service_tier, usage.input_tokens)
        uncached = max(usage.input_tokens - usage.cached_input_tokens - usage.cache_write_tokens, 0)
        visible_output = max(usage.output_tokens - usage.reasoning_tokens, 0)
        return (
            uncached * r.input
            + usage.cached_input_tokens * r.cached_input
            + usage.cache_write_tokens * r.cache_write
            + visible_output * r.output
            + usage.reasoning_tokens * r.reasoning
        )

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


def _rates(section: Section, base: Rates | None = None) -> Rates:
    input_rate = _rate(section, "input", base.input if base else None)
    output_rate = _rate(section, "output", base.output if base else None)
    return Rates(
        input=input_rate,
        cached_input=_rate(section, "cached_input", input_rate),
        output=output_rate,
        reasoning=_rate(section, "reasoning", output_rate),
        cache_write=_rate(section, "cache_write", input_rate),
    )


def _model(name: str, provider: str, s: Section) -> tuple[ModelPrice, list[str]]:
    s.check_unknown(_MODEL_KEYS)
    rates = _rates(s)
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
    return (
        ModelPrice(name, provider, rates, tiers, above, long_rates, max_output),
        s.strings("aliases"),
    )


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
