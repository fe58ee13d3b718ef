"""Budget policies and the pure admission decision. No I/O, no clock: callers pass `now`.

A policy sets limits for a scope (one agent, `defaults` for agents without their own, or
`global` for all agents together). Admission builds one `Check` per applicable limit and
asks `breaches()`; a call is admitted only if, for every limit, used + reserved + this
call's amount <= limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from proxy.money import usd_fixed, usd_to_pico
from proxy.schema import FieldError, Section

COST_LIMITS = {
    "max_cost_per_hour_usd": "hour",
    "max_cost_per_day_usd": "day",
    "max_cost_per_week_usd": "week",
    "max_cost_per_month_usd": "month",
}
INTENT_LIMITS = {"max_intents_per_hour": "hour", "max_intents_per_day": "day"}
REQUESTS_LIMIT = "max_requests_per_minute"
INTENT_COST_LIMIT = "max_cost_per_intent_usd"
ACTIONS = ("block", "alert", "pause")
POLICY_KEYS = (
    *COST_LIMITS,
    *INTENT_LIMITS,
    REQUESTS_LIMIT,
    INTENT_COST_LIMIT,
    "action_on_breach",
    "loop_guard",
)
COST_WINDOWS = ("hour", "day", "week", "month")
LOOP_CODE = "loop_detected"
PAUSED_CODE = "agent_paused"


@dataclass(frozen=True, slots=True)
class LoopGuard:
    max_identical_requests: int
    window_seconds: float


@dataclass(frozen=True)
class Policy:
    cost: Mapping[str, int] = field(default_factory=dict)  # window -> pico-USD
    intents: Mapping[str, int] = field(default_factory=dict)  # window -> distinct intents
    requests_per_minute: int | None = None
    cost_per_intent: int | None = None
    action: str = "block"
    loop_guard: LoopGuard | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def has_cost_limit(self) -> bool:
        return bool(self.cost) or self.cost_per_intent is not None

    def to_json(self) -> dict[str, Any]:
        return dict(self.source)


def parse_policy(section: Section, *, scope: str = "agent") -> Policy:
    """A policy mapping (config or admin API); raises FieldError naming the key."""
    section.check_unknown(POLICY_KEYS)
    cost = {}
    for key, window in COST_LIMITS.items():
        amount = section.usd(key, None)
        if amount is not None:
            cost[window] = usd_to_pico(amount)
    intents = {w: section.integer(k, None, min=0) for k, w in INTENT_LIMITS.items()}
    action = section.choice("action_on_breach", ACTIONS, "block")
    if scope == "global" and action == "pause":
        section.fail("action_on_breach", "pause applies to one agent; use block for global")
    per_intent = section.usd(INTENT_COST_LIMIT, None)
    guard = None
    if section.has("loop_guard"):
        g = section.section("loop_guard")
        g.check_unknown(("max_identical_requests", "window_seconds"))
        guard = LoopGuard(
            g.integer("max_identical_requests", min=1), g.number("window_seconds", min=0.001)
        )
    source = {k: v for k, v in section.data.items() if v is not None}
    return Policy(
        cost=cost,
        intents={w: n for w, n in intents.items() if n is not None},
        requests_per_minute=section.integer(REQUESTS_LIMIT, None, min=0),
        cost_per_intent=usd_to_pico(per_intent) if per_intent is not None else None,
        action=action,
        loop_guard=guard,
        source=source,
    )


@dataclass(frozen=True)
class PolicySet:
    """Config policies plus API-set ones; an API-set agent policy wins over the config's."""

    global_policy: Policy | None = None
    defaults: Policy | None = None
    agents: Mapping[str, Policy] = field(default_factory=dict)
    api: Mapping[str, Policy] = field(default_factory=dict)

    def for_agent(self, agent: str) -> tuple[Policy | None, str | None]:
        if agent in self.api:
            return self.api[agent], "api"
        if agent in self.agents:
            return self.agents[agent], "config"
        if self.defaults is not None:
            return self.defaults, "defaults"
        return None, None

    def with_api(self, api: Mapping[str, Policy]) -> PolicySet:
        return PolicySet(self.global_policy, self.defaults, self.agents, dict(api))

    def names(self) -> set[str]:
        return set(self.agents) | set(self.api)


def parse_policies(section: Section) -> PolicySet:
    agents = section.section("agents")
    return PolicySet(
        global_policy=parse_policy(section.section("global"), scope="global")
        if section.has("global")
        else None,
        defaults=parse_policy(section.section("defaults")) if section.has("defaults") else None,
        agents={str(name): parse_policy(agents.section(name)) for name in agents.data},
    )


# -- calendar windows ---------------------------------------------------------------------


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


# -- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    scope: str  # "agent", "global" or "intent"
    subject: str  # the agent name, "global", or the intent id
    limit: str  # the limit's key, e.g. max_cost_per_day_usd
    money: bool  # True: values are pico-USD; False: counts
    limit_value: int
    used: int
    reserved: int
    amount: int  # what this call adds: its worst-case cost, or 1
    action: str
    resets_at: float | None  # None: lifetime (intent)

    @property
    def remaining(self) -> int:
        return self.limit_value - self.used - self.reserved

    @property
    def breached(self) -> bool:
        return self.used + self.reserved + self.amount > self.limit_value


def breaches(checks: Iterable[Check]) -> list[Check]:
    return [c for c in checks if c.breached]


def decisive(breached: list[Check]) -> Check | None:
    """The breach that refuses the call: pause before block; then the tightest remainder."""
    refusing = [c for c in breached if c.action in ("block", "pause")]
    if not refusing:
        return None
    refusing.sort(key=lambda c: (c.action != "pause", not c.money, c.remaining))
    return refusing[0]


def _describe_scope(check: Check) -> str:
    if check.scope == "global":
        return "all agents together"
    return f"{check.scope} '{check.subject}'"


def _amount(check: Check, value: int) -> str:
    return f"${usd_fixed(value, 4)}" if check.money else str(value)


def refusal_message(check: Check, calendar: Calendar, now: float) -> str:
    if check.limit == LOOP_CODE:
        return (
            f"agent '{check.subject}' sent the same request {check.used + 1} times within the"
            f" loop guard's window (limit {check.limit_value}): this looks like a runaway loop"
        )
    parts = [
        f"{_describe_scope(check)} reached {check.limit}: used {_amount(check, check.used)}"
        f" of {_amount(check, check.limit_value)}"
    ]
    if check.reserved:
        parts.append(f" ({_amount(check, check.reserved)} reserved by calls in flight)")
    if check.money and check.amount:
        left = max(check.remaining, 0)
        parts.append(
            f"; this call could cost up to {_amount(check, check.amount)}"
            f" but only {_amount(check, left)} remains"
        )
    if check.resets_at is None:
        parts.append("; this limit is for the intent's lifetime and does not reset")
    else:
        wait = max(int(check.resets_at - now), 0)
        parts.append(f"; resets at {calendar.iso(check.resets_at)} (in {_duration(wait)})")
    return "".join(parts)


def pause_reason(check: Check, calendar: Calendar, now: float) -> str:
    return (
        f"breached {check.limit} at {calendar.iso(now)}: {_describe_scope(check)} used"
        f" {_amount(check, check.used)} of {_amount(check, check.limit_value)}"
    )


def _duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def validate_policy_json(data: object) -> Policy:
    """A policy from the admin API; FieldError names the bad key."""
    if not isinstance(data, dict):
        raise FieldError("(body)", data, "a policy must be a JSON object")
    return parse_policy(Section(data))
