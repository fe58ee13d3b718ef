import random
from decimal import ROUND_HALF_EVEN, Decimal

from proxy.money import usd_fixed


def _decimal_fixed(pico: int, places: int) -> str:
    exact = Decimal(pico) / Decimal(10**12)
    text = f"{exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN):.{places}f}"
    return text[1:] if text.startswith("-") and Decimal(text) == 0 else text  # no "-0.00"


def test_usd_fixed_rounds_half_even_as_decimal_does() -> None:
    assert usd_fixed(212_500_000) == "0.000212"  # 0.0002125: the half goes to the even 2
    assert usd_fixed(213_500_000) == "0.000214"
    assert usd_fixed(-499_999, 6) == "0.000000"  # rounds to zero: no minus sign
    assert usd_fixed(1_500_000_000_000, 0) == "2"
    assert usd_fixed(2_500_000_000_000, 0) == "2"
    assert usd_fixed(7, 12) == "0.000000000007"
    edges = [0, 1, -1, 499_999, 500_000, 500_001, 1_500_000, 2_500_000, -2_500_000,
             999_999_999_999, 10**12, -(10**12), 10**18 + 123_456_789]  # fmt: skip
    rng = random.Random(15)
    values = edges + [rng.randint(-(10**16), 10**16) for _ in range(20_000)]
    for value in values:
        for places in (0, 2, 4, 6, 12) if value in edges else (rng.randint(0, 12),):
            assert usd_fixed(value, places) == _decimal_fixed(value, places), (value, places)
