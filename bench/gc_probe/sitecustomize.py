"""Put on a proxy's PYTHONPATH by `bench.streams`: the cycle collector's pauses.

Python imports `sitecustomize` at start-up, so the proxy under test runs unchanged. Every
collection of 0.5 ms or more is kept (wall-clock start, milliseconds, generation) and
written as JSON to `$BENCH_GC_PAUSES` when the process exits.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import time
from typing import Any

_OUT = os.environ.get("BENCH_GC_PAUSES")
_pauses: list[tuple[float, float, int]] = []
_began = [0.0, 0.0]


def _timed(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _began[0], _began[1] = time.time(), time.perf_counter()
        return
    ms = (time.perf_counter() - _began[1]) * 1000
    if ms >= 0.5:
        _pauses.append((_began[0], round(ms, 2), int(info["generation"])))


def _write() -> None:
    assert _OUT is not None
    with open(_OUT, "w") as f:
        json.dump(_pauses, f)


if _OUT:
    gc.callbacks.append(_timed)
    atexit.register(_write)
