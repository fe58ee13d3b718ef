"""`meterproxy pricing import`: the LiteLLM community price table -> our pricing.yaml.

LiteLLM prices are USD per token; ours are USD per 1M tokens, at most 6 decimal places.
"""

from __future__ import annotations

import datetime
import json
import re
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import yaml

from proxy.pricing import PricingError, parse_price_table

_MODES = {"chat", "completion", "responses", "embedding", None}
_LONG = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")


class ImportError_(Exception):
    pass


def _per_million(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        d = Decimal(str(value)) * 10**6
    except ArithmeticError:
        return None
    if d < 0:
        return None
    return d.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN).normalize()


def _num(d: Decimal) -> float | int:
    return int(d) if d == d.to_integral_value() else float(d)


def _rates(entry: dict[str, Any], suffix: str = "") -> dict[str, float | int]:
    keys = {
        "input": "input_cost_per_token",
        "cached_input": "cache_read_input_token_cost",
        "output": "output_cost_per_token",
        "reasoning": "output_cost_per_reasoning_token",
        "cache_write": "cache_creation_input_token_cost",
    }
    out = {}
    for ours, theirs in keys.items():
        value = _per_million(entry.get(theirs + suffix))
        if value is not None:
            out[ours] = _num(value)
    return out


def convert_entry(entry: dict[str, Any]) -> dict[str, Any] | None:
    base = _rates(entry)
    if "input" not in base:
        return None
    base.setdefault("output", 0)
    model: dict[str, Any] = dict(base)
    for tier in ("priority", "flex"):
        rates = _rates(entry, f"_{tier}")
        if "input" in rates or "output" in rates:
            model[tier] = rates
    for key in entry:
        m = _LONG.match(key)
        if m:
            suffix = f"_above_{m.group(1)}k_tokens"
            long = _rates(entry, suffix)
            if long:
                model["long_context"] = {"above_tokens": int(m.group(1)) * 1000, **long}
            break
    max_output = entry.get("max_output_tokens")
    if isinstance(max_output, int) and max_output > 0:
        model["max_output"] = max_output
    return model


def import_litellm(path: Path, providers: list[str] | None = None) -> tuple[str, str]:
    """Returns (YAML text, one-line summary). Raises ImportError_ on unusable input."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImportError_(f"{path}: cannot read a JSON price table: {e}") from None
    if not isinstance(data, dict):
        raise ImportError_(f"{path}: expected a JSON object of models")
    out: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    skipped = 0
    for name, entry in data.items():
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        provider = str(entry.get("litellm_provider") or "unknown")
        if providers and provider not in providers:
            continue
        if entry.get("mode") not in _MODES:
            skipped += 1
            continue
        model = convert_entry(entry)
        if model is None:
            skipped += 1
            continue
        short = name.split("/", 1)[1] if name.startswith(provider + "/") else name
        if short in taken:
            skipped += 1  # first entry of a name wins; later ones are other routes to it
            continue
        taken.add(short)
        section = out.setdefault(
            provider,
            {"source": f"imported from {path.name} (LiteLLM community price table)", "models": {}},
        )
        section["models"][short] = model
    today = datetime.date.today().isoformat()
    header = (
        f"# Imported by `meterproxy pricing import` from {path.name} on {today}.\n"
        "# USD per 1M tokens. Check against each provider's pricing page before relying on it.\n"
    )
    text = header + yaml.safe_dump(
        {"updated": today, "providers": out}, sort_keys=False, allow_unicode=True, width=100
    )
    try:
        table = parse_price_table(text, "(imported table)")
    except PricingError as e:
        raise ImportError_(f"the converted table does not validate: {e}") from None
    summary = f"imported {len(table.models)} models from {len(out)} providers, skipped {skipped}"
    return text, summary
