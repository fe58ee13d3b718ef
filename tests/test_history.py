"""proxy.history: the expected output size is the 95th percentile of the last KEEP."""

from __future__ import annotations

import math
import random
from collections import deque

from proxy.history import KEEP, PERCENTILE, OutputHistory


def _percentile(values: deque[int]) -> int:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, math.ceil(PERCENTILE * len(ranked)) - 1)]


async def test_the_percentile_follows_the_last_outputs_as_they_come() -> None:
    history = OutputHistory(None)
    assert await history.expected("a", "m") is None
    window: deque[int] = deque(maxlen=KEEP)
    rnd = random.Random(5)
    for _ in range(3 * KEEP):  # ties, zeros and the oldest leaving the window
        tokens = rnd.choice([0, 1, 5, 5, 64, 1000, rnd.randrange(10**6)])
        history.record("a", "m", tokens)
        window.append(tokens)
        assert await history.expected("a", "m") == _percentile(window)
    assert await history.expected("a", "other") is None  # per model


async def test_a_key_not_asked_for_yet_records_nothing() -> None:
    history = OutputHistory(None)
    history.record("a", "m", 500)  # not loaded: it would come from the ledger
    assert await history.expected("a", "m") is None
    history.record("a", "m", 700)
    assert await history.expected("a", "m") == 700
