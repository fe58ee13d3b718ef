"""Calendar windows (minute, hour, day, ISO week, month) in one time zone: budgets reset
at their boundaries, reports group by them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo


class Calendar:
    """Calendar windows (minute, hour, day, ISO week, month) in one time zone.

    Boundaries are computed once per window and memoised until the window ends, so the hot
    path does a comparison, not a time-zone conversion.
    """

    KINDS = ("minute", "hour", "day", "week", "month")

    def __init__(self, tz: str = "UTC") -> None:
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self._memo: dict[str, tuple[float, float]] = {}
        self._stable = (0.0, 0.0)

    def stable_span(self, now: float) -> tuple[float, float]:
        """The stretch around `now` in which no window of any kind starts or ends
        (normally its minute): what depends only on the windows holds for all of it."""
        span = self._stable
        if span[0] <= now < span[1]:
            return span
        spans = [self.window(kind, now) for kind in self.KINDS]
        self._stable = span = (max(s for s, _ in spans), min(e for _, e in spans))
        return span

    def window(self, kind: str, now: float) -> tuple[float, float]:
        memo = self._memo.get(kind)
        if memo is not None and memo[0] <= now < memo[1]:
            return memo
        span = self._compute(kind, now)
        self._memo[kind] = span
        return span

    def _compute(self, kind: str, now: float) -> tuple[float, float]:
        if kind == "minute":
            start = now - now % 60
            return start, start + 60
        local = datetime.fromtimestamp(now, self.tz)
        if kind == "hour":
            # Whole hours in UTC are whole local hours except in :30/:45 zones; go local.
            start_dt = local.replace(minute=0, second=0, microsecond=0)
            start = start_dt.timestamp()
            end = (start_dt.astimezone(UTC) + timedelta(hours=1)).timestamp()
            return start, end
        day = local.date()
        if kind == "day":
            first, nxt = day, day + timedelta(days=1)
        elif kind == "week":
            first = day - timedelta(days=day.weekday())
            nxt = first + timedelta(days=7)
        elif kind == "month":
            first = day.replace(day=1)
            nxt = (first + timedelta(days=32)).replace(day=1)
        else:
            raise ValueError(f"unknown window {kind!r}")
        return self._midnight(first), self._midnight(nxt)

    def _midnight(self, d: date) -> float:
        return datetime(d.year, d.month, d.day, tzinfo=self.tz).timestamp()

    def window_start(self, kind: str, t: float) -> float:
        """Start of the window containing `t` (not memoised: for reports)."""
        return self._compute(kind, t)[0]

    def iso(self, t: float) -> str:
        return datetime.fromtimestamp(t, self.tz).isoformat(timespec="seconds")
