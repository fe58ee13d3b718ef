"""Exact money: every amount inside meterproxy is an int of pico-USD (1e-12 USD).

Prices are USD per 1M tokens with at most 6 decimal places, so a per-token price is a
whole number of pico-USD and `tokens * price` is exact. Decimal appears only at the
edges (parsing config, printing reports).
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

PICO_PER_USD = 10**12
_PICO = Decimal(PICO_PER_USD)


class MoneyError(ValueError):
    pass


def parse_usd(value: object) -> Decimal:
    """A USD amount from YAML/JSON: str, int or float (floats via their shortest repr)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise MoneyError("must be a number")
    try:
        d = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise MoneyError("must be a number") from None
    if not d.is_finite():
        raise MoneyError("must be a finite number")
    return d


def usd_to_pico(d: Decimal) -> int:
    """Exact conversion; amounts finer than 1e-12 USD are rounded half-even."""
    return int((d * _PICO).to_integral_value(rounding=ROUND_HALF_EVEN))


def pico_to_usd(pico: int) -> Decimal:
    return Decimal(pico) / _PICO


def usd_exact(pico: int) -> str:
    """The exact amount as a plain decimal string, no exponent, no trailing zeros."""
    d = pico_to_usd(pico)
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return s or "0"


def usd_fixed(pico: int, places: int = 6) -> str:
    q = Decimal(1).scaleb(-places)
    return format(pico_to_usd(pico).quantize(q, rounding=ROUND_HALF_EVEN), "f")
