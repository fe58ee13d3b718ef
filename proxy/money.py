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
    """The exact amount as a plain decimal string, no exponent, no trailing zeros.

    Integer arithmetic, not Decimal: this runs for every response's x-meter-cost-usd."""
    sign = "-" if pico < 0 else ""
    whole, frac = divmod(abs(pico), PICO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:012d}".rstrip("0")


def usd_fixed(pico: int, places: int = 6) -> str:
    """Rounded half-even to `places` decimals, for display (log lines, tables)."""
    step = 10 ** (12 - places)
    units, rest = divmod(abs(pico), step)
    if rest * 2 > step or (rest * 2 == step and units % 2):
        units += 1
    whole, frac = divmod(units, 10**places)
    sign = "-" if pico < 0 and units else ""
    # zfill: a nested format spec ({frac:0{places}d}) is parsed on every call, 2.7x slower.
    return f"{sign}{whole}.{str(frac).zfill(places)}" if places else f"{sign}{whole}"


def _places_for(pico: int, significant: int) -> int:
    """Decimal places that show `significant` digits of a non-zero amount."""
    digits = len(str(abs(pico)))  # digits of the pico-USD integer
    return max(0, min(12, 12 - digits + significant))


def usd_sig(*amounts: int, significant: int = 2, min_places: int = 4) -> list[str]:
    """Amounts to be read side by side, in one format: at least `min_places` decimals,
    enough for `significant` digits of the smallest non-zero one, and more while two
    different amounts would still print the same ($0.0002 of $0.0002 is no answer)."""
    places = max(
        [min_places, *(_places_for(a, significant) for a in amounts if a)], default=min_places
    )
    while places < 12:
        shown = {usd_fixed(a, places) for a in set(amounts)}
        if len(shown) == len(set(amounts)):
            break
        places += 1
    return [usd_fixed(a, places) for a in amounts]
