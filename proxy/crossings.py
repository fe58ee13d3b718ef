"""Events for limits being approached: a threshold crossed (50%, 80%, 100%) and a runway
that ends inside `alerts.runway_seconds`. Each fires once per limit and window; with
shared budgets, once across replicas (the first to claim it in the database sends it).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy import events
from proxy.admission import GLOBAL, Limit, Plan, plan_limits
from proxy.counters import CounterStore
from proxy.money import usd_exact, usd_sig
from proxy.spend_rate import runway, runway_text
from proxy.storage.base import StorageUnavailable
from proxy.windows import Calendar

log = logging.getLogger("meterproxy.budgets")
_MAX_FIRED = 100_000
# A runway is worked out from 15 minute counters: per limit at most this often, not per
# call (an alert a few seconds late is as good; the hot path pays for it otherwise).
RUNWAY_EVERY_SECONDS = 10.0


class Crossings:
    def __init__(
        self,
        calendar: Calendar,
        bus: events.EventBus,
        thresholds: tuple[float, ...] = (0.5, 0.8, 1.0),
        runway_seconds: float = 3600.0,
    ) -> None:
        self.calendar = calendar
        self.bus = bus
        self.thresholds = tuple(sorted(thresholds))
        self.runway_seconds = runway_seconds  # alert when a limit runs out sooner than this
        self._fired: set[tuple[Any, ...]] = set()
        self._runway_seen: dict[tuple[str, str, str], float] = {}  # limit -> last worked out
        self.claims: set[asyncio.Future[None]] = set()  # pending claims (shared budgets)

    def after_spend(
        self, store: CounterStore, plan: Plan, agent: str, intent: str | None, now: float
    ) -> None:
        # The limits alone: admitting (demands, spend keys) is not what happens here.
        for lim in plan_limits(plan, agent, intent, self.calendar, now, counting=False):
            if not lim.money or lim.value <= 0:
                continue
            used = store.value(lim.key)[0]
            for threshold in self.thresholds:
                if used < threshold * lim.value:
                    break
                key = (lim.scope, lim.subject, lim.name, lim.key.start, threshold)
                if self._once(key):
                    self._fire(store, key, threshold_event(lim, used, threshold, now, agent))
            self._runway(store, lim, agent, now)

    def _once(self, key: tuple[Any, ...]) -> bool:
        """True the first time `key` is seen (this process)."""
        if key in self._fired:
            return False
        self._fired.add(key)
        if len(self._fired) > _MAX_FIRED:
            start = key[3]
            self._fired = {k for k in self._fired if k[3] >= start}
        return True

    def _runway(self, store: CounterStore, lim: Limit, agent: str, now: float) -> None:
        """A `budget_runway` event when the limit will run out, at the last 15 minutes'
        rate, within alerts.runway_seconds and before it resets."""
        if self.runway_seconds <= 0 or lim.scope not in ("agent", GLOBAL):
            return
        key = (lim.scope, lim.subject, lim.name, lim.key.start, "runway")
        if key in self._fired:
            return
        limit_id = (lim.scope, lim.subject, lim.name)
        last = self._runway_seen.get(limit_id)
        if last is not None and 0 <= now - last < RUNWAY_EVERY_SECONDS:
            return
        if len(self._runway_seen) > _MAX_FIRED:
            self._runway_seen.clear()
        self._runway_seen[limit_id] = now
        used, reserved = store.value(lim.key)
        left = max(lim.value - used - reserved, 0)
        way = runway(store, lim.key.scope, left, now, lim.resets_at)
        if way.seconds is None or not way.before_reset or way.seconds > self.runway_seconds:
            return
        self._once(key)
        who = "all agents" if lim.scope == GLOBAL else f"{lim.scope} '{lim.subject}'"
        rate, remains, limit = usd_sig(way.rate_pico_per_minute, left, lim.value)
        message = (f"{who} {runway_text(way.seconds)} of {lim.name} at the rate of the last 15"
                   f" minutes (${rate}/min): ${remains} of ${limit} left; the window resets"
                   f" at {self.calendar.iso(lim.key.end)}")  # fmt: skip
        self._fire(store, key, events.Event(events.RUNWAY, message, now, agent, {
            "scope": lim.scope, "subject": lim.subject, "limit": lim.name,
            "runway_seconds": round(way.seconds), "rate_usd_per_minute": usd_exact(
                way.rate_pico_per_minute), "remaining_usd": usd_exact(left),
            "window_start": lim.key.start,
        }))  # fmt: skip

    def _fire(self, store: CounterStore, key: tuple[Any, ...], event: events.Event) -> None:
        if not store.shared:
            self.bus.emit(event)
            return
        claim_key = "|".join(str(part) for part in key)
        shared: Any = store

        async def claim() -> None:
            try:
                if await shared.claim_alert(claim_key, event.at):
                    self.bus.emit(event)
            except StorageUnavailable:
                self.bus.emit(event)  # better twice than never

        task = asyncio.ensure_future(claim())
        self.claims.add(task)
        task.add_done_callback(self.claims.discard)


def threshold_event(lim: Limit, used: int, threshold: float, now: float, agent: str
                    ) -> events.Event:  # fmt: skip
    pct = round(threshold * 100)
    who = "all agents" if lim.scope == GLOBAL else f"{lim.scope} '{lim.subject}'"
    message = (f"{who} has used {pct}% of {lim.name}: ${usd_exact(used)} of"
               f" ${usd_exact(lim.value)}")  # fmt: skip
    return events.Event(events.THRESHOLD, message, now, agent, {
        "scope": lim.scope, "subject": lim.subject, "limit": lim.name, "threshold": threshold,
        "used_usd": usd_exact(used), "limit_usd": usd_exact(lim.value),
        "window_start": lim.key.start,
    })  # fmt: skip
