"""Spend rates: the breaker that trips on a runaway's rate (`max_spend_rate`), and the
runway of every limit (when it runs out at the rate of the last 15 minutes).

Both read per-minute spend counters (`cost:minute`, kept for every agent and for all
agents together, and per intent while a per-intent rate applies), which the counter
stores keep like any other: in memory, or in PostgreSQL for replicas. The baseline of a
relative rate is the median, over the last 7 days, of the agent's spend in this hour of
the day, read from the ledger's rollups once an hour.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from proxy.admission import Check, Plan, intent_scope, minute_key
from proxy.counters import CounterStore
from proxy.money import usd_sig
from proxy.policy import RATE_LIMIT, SpendRate
from proxy.windows import Calendar

RUNWAY_MINUTES = 15
BASELINE_DAYS = 7
# (bucket start, pico-USD) of one agent's spend since a moment, from the rollups.
BucketSource = Callable[[str, float], Awaitable[list[tuple[float, int]]]]


def spent_over(store: CounterStore, scope: str, now: float, minutes: int) -> int:
    """What `scope` spent in the last `minutes` minutes, the current one included."""
    return sum(store.value(minute_key(scope, now - 60 * i))[0] for i in range(minutes))


def per_minute(store: CounterStore, scope: str, now: float, minutes: int) -> int:
    """pico-USD per minute over the last `minutes` minutes (integer, rounded down)."""
    return spent_over(store, scope, now, minutes) // minutes


@dataclass(frozen=True, slots=True)
class Runway:
    rate_pico_per_minute: int  # over the last 15 minutes
    seconds: float | None  # until the limit is reached at that rate; None: rate 0
    before_reset: bool  # it runs out before the window resets


def runway(store: CounterStore, scope: str, remaining: int, now: float, resets_at: float | None
           ) -> Runway:  # fmt: skip
    rate = per_minute(store, scope, now, RUNWAY_MINUTES)
    if rate <= 0:
        return Runway(0, None, False)
    seconds = max(remaining, 0) / rate * 60
    return Runway(rate, seconds, resets_at is None or now + seconds < resets_at)


def runway_text(seconds: float | None) -> str:
    if seconds is None:
        return "not spending"
    if seconds < 60:
        return "runs out within a minute"
    minutes = int(seconds // 60)
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    if days:
        return f"runs out in {days}d {hours}h"
    return f"runs out in {hours}h {mins:02d}m" if hours else f"runs out in {mins}m"


class Baselines:
    """Each agent's usual spend rate at this hour of the day, from the rollups."""

    def __init__(self, source: BucketSource | None, calendar: Calendar) -> None:
        self.source = source
        self.calendar = calendar
        self._cache: dict[tuple[str, float], int] = {}  # (agent, hour start) -> pico/min

    def hour_start(self, now: float) -> float:
        return self.calendar.window("hour", now)[0]

    def known(self, agent: str, now: float) -> int | None:
        return self._cache.get((agent, self.hour_start(now)))

    async def load(self, agent: str, now: float) -> int:
        """The median over the last 7 days of the agent's spend in this hour of the day,
        per minute (a day it did not spend counts as 0)."""
        hour = self.hour_start(now)
        cached = self._cache.get((agent, hour))
        if cached is not None:
            return cached
        if len(self._cache) > 50_000:
            self._cache = {k: v for k, v in self._cache.items() if k[1] == hour}
        per_day = [0] * BASELINE_DAYS
        if self.source is not None:
            since = hour - BASELINE_DAYS * 86400
            for bucket, cost in await self.source(agent, since):
                days = math.ceil((hour - bucket) / 86400)  # this hour, `days` days ago?
                if 1 <= days <= BASELINE_DAYS and bucket < hour - days * 86400 + 3600:
                    per_day[days - 1] += cost
        baseline = int(statistics.median(per_day)) // 60
        self._cache[(agent, hour)] = baseline
        return baseline


class RateWatch:
    """The spend-rate breaker: a check per applicable `max_spend_rate`, read from the
    minute counters (extra checks that no store enforces: see `admission.decide`)."""

    def __init__(self, baselines: Baselines) -> None:
        self.baselines = baselines

    async def prepare(self, plan: Plan, agent: str, now: float) -> None:
        for app in plan.applicable:
            rate = app.policy.spend_rate
            if rate is not None and rate.times_baseline is not None:
                await self.baselines.load(agent, now)

    def checks(
        self, plan: Plan, store: CounterStore, agent: str, intent: str | None, now: float
    ) -> Iterable[Check]:
        for app in plan.applicable:
            rate = app.policy.spend_rate
            if rate is None:
                continue
            if rate.per == "intent":
                if intent is None:
                    continue
                scope, kind, subject = intent_scope(agent, intent), "intent", intent
            else:
                scope, kind, subject = app.counters, app.scope, app.subject
            threshold, usual = self.threshold(rate, agent, now)
            used = spent_over(store, scope, now, rate.over_minutes)
            note = describe(rate, used, threshold, usual)
            yield Check(kind, subject, RATE_LIMIT, True, threshold * rate.over_minutes, used, 0,
                        0, app.policy.action, math.floor(now / 60) * 60 + 60, note)  # fmt: skip

    def threshold(self, rate: SpendRate, agent: str, now: float) -> tuple[int, int | None]:
        """(pico-USD per minute allowed, the baseline it was set from or None)."""
        if rate.pico_per_minute is not None:
            return rate.pico_per_minute, None
        usual = self.baselines.known(agent, now) or 0
        assert rate.times_baseline is not None
        return max(int(usual * rate.times_baseline), rate.min_pico_per_minute), usual


def describe(rate: SpendRate, used: int, threshold: int, usual: int | None) -> str:
    now_rate, limit, base = usd_sig(used // rate.over_minutes, threshold, usual or 0,
                                    significant=3)  # fmt: skip
    text = (f"spending ${now_rate}/min over the last {rate.over_minutes} minutes, above"
            f" ${limit}/min")  # fmt: skip
    if usual is not None:
        text += f" ({rate.times_baseline:g}x its usual ${base}/min at this hour"
        text += f", at least ${usd_sig(rate.min_pico_per_minute)[0]}/min)"
    return text
