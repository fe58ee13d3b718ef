"""A call's explicit state: how far it got, and when each step happened."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Phase(enum.IntEnum):
    RECEIVED = 0  # being read and checked
    ADMITTED = 1  # a budget reservation is held
    FORWARDED = 2  # the request went to the upstream (or is on its way)
    RECORDED = 3  # its ledger row is submitted


@dataclass(slots=True)
class Timings:
    start: float
    sent: float | None = None  # the request went to the upstream
    head: float | None = None  # the upstream's response head arrived
    done: float | None = None  # the upstream's last byte arrived

    @property
    def upstream_seconds(self) -> float | None:
        if self.sent is None or self.done is None:
            return None
        return self.done - self.sent
