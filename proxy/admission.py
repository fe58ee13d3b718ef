"""The admission decision, pure: no I/O, no clock (callers pass `now`).

`plan_admission` turns the policies that apply to a call into demands on counters: what
admitting it adds to each, and the cap its block and pause limits allow. A counter store
(in memory, or PostgreSQL for replicas) checks every cap and applies every demand, all or
nothing, and answers with the counters as they were (`Outcome`). `decide` then reads that
answer: which limit refused the call and why, which alerts and dry-run (shadow) refusals
it raises. Both stores run the same two functions, so they cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar, cast

from proxy.policy import (
    COST_LIMITS,
    COST_WINDOWS,
    INTENT_COST_LIMIT,
    INTENT_LIMITS,
    LOOP_CODE,
    PROGRESS_LIMIT,
    REFUSING,
    REQUESTS_LIMIT,
    Action,
    Policy,
    PolicySet,
)
from proxy.storage.base import CounterKey
from proxy.windows import Calendar

GLOBAL = "global"
LIFETIME = (0.0, 1e18)  # the "window" of an intent's lifetime counter
MINUTE_KIND = "cost:minute"  # per-minute spend, for spend rates (see proxy.spend_rate)
_SEP = "\x1f"  # ids cannot contain control characters (proxy.ids): a safe separator
_MEMO_SPAN = ("span",)
_MEMO_MAX = 4096  # entries per plan (an agent's intents in one minute); then it starts over
T = TypeVar("T")


def agent_scope(agent: str) -> str:
    return f"agent:{agent}"


def intent_scope(agent: str, intent: str) -> str:
    """An intent lives in its agent's lane: another agent using the same id is another
    intent, so no agent can spend or pause someone else's task."""
    return f"intent:{agent}{_SEP}{intent}"


def user_scope(agent: str, user: str) -> str:
    """An end user lives in their agent's lane too: agents' customer ids are their own."""
    return f"user:{agent}{_SEP}{user}"


def intent_key(agent: str, intent: str) -> CounterKey:
    return CounterKey(intent_scope(agent, intent), "cost:life", *LIFETIME)


def split_scope(scope: str) -> tuple[str, str, str | None]:
    """`agent:a` -> ("agent", "a", None); `intent:a\\x1fi` -> ("intent", "a", "i");
    `user:a\\x1fu` -> ("user", "a", "u")."""
    kind, _, rest = scope.partition(":")
    if kind == GLOBAL:
        return GLOBAL, "", None
    first, sep, second = rest.partition(_SEP)
    return kind, first, second if sep else None


# -- what applies to an agent ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Applicable:
    scope: str  # "agent", "user" or "global"
    subject: str  # the agent's name, the end user's id, or "global"
    policy: Policy
    counters: str  # the scope of the counters it reads (see agent_scope, user_scope)


@dataclass(frozen=True, slots=True)
class Plan:
    """What applies to one agent under the policies in force, worked out once."""

    applicable: tuple[Applicable, ...]
    needs_estimate: bool  # a cost limit applies: admission needs the call's cost
    loop_policy: Policy | None  # whose loop guard applies (the agent's own, else global)
    refuses: bool  # some limit blocks or pauses (what fail-closed protects)
    user_scope: str | None = None  # an end user's limits apply: their counters' scope
    rates: bool = False  # a spend-rate breaker applies
    rate_per_intent: bool = False  # ...per intent: the intent's minute counters are kept
    progress: bool = False  # a limit on spend without progress applies
    # What depends only on the plan and which calendar windows `now` is in (its limits,
    # its spend keys), kept for as long as no window changes: see `_memo`.
    memo: dict[tuple[object, ...], object] = field(default_factory=dict, compare=False,
                                                   repr=False)  # fmt: skip


def make_plan(policies: PolicySet, agent: str, user: str | None = None) -> Plan:
    applicable = []
    policy, _ = policies.for_agent(agent)
    if policy is not None:
        applicable.append(Applicable("agent", agent, policy, agent_scope(agent)))
    user_policy = policies.for_user(user)
    scope_of_user = None
    if user_policy is not None and user is not None:
        scope_of_user = user_scope(agent, user)
        applicable.append(Applicable("user", user, user_policy, scope_of_user))
    g = policies.global_policy
    if g is not None:
        applicable.append(Applicable(GLOBAL, GLOBAL, g, GLOBAL))
    loop = None
    if policy is not None and policy.loop_guard is not None:
        loop = policy
    elif g is not None and g.loop_guard is not None:
        loop = g
    return Plan(
        tuple(applicable),
        any(a.policy.has_cost_limit for a in applicable),
        loop,
        any(a.policy.refuses for a in applicable),
        scope_of_user,
        any(a.policy.spend_rate is not None for a in applicable),
        any(
            a.policy.spend_rate is not None and a.policy.spend_rate.per == "intent"
            for a in applicable
        ),
        any(a.policy.cost_without_progress is not None for a in applicable),
    )


# -- demands -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit that applies to a call, and the counter it reads."""

    scope: str  # agent, global or intent
    subject: str  # the agent's name, "global", or the intent id
    name: str  # the limit's key, e.g. max_cost_per_day_usd
    money: bool  # pico-USD (True) or a count
    value: int
    action: Action
    key: CounterKey
    new_only: bool = False  # counts a new intent: applies only when the intent is new
    offset: int = 0  # spend on the counter that this limit does not count (progress)

    @property
    def resets_at(self) -> float | None:
        return None if self.key.kind == "cost:life" else self.key.end


class Demand(NamedTuple):
    """What admitting a call adds to one counter, and the most used + reserved may be
    before it (None: not checked). A tuple: every admission builds its own."""

    key: CounterKey
    add_used: int
    add_reserved: int
    cap: int | None
    new_only: bool = False


class _Shape(NamedTuple):
    """One counter a call's admission touches, as far as the call's amount does not
    matter: kept per plan and window (see `_memoized`)."""

    key: CounterKey
    money: bool  # adds the call's amount to reserved (else 1 to used)
    new_only: bool
    cap_value: int | None  # the tightest refusing limit's value (None: not checked)

    def demand(self, amount: int) -> Demand:
        """Its demand for a call reserving `amount` (a money counter), or counting 1."""
        add = amount if self.money else 1
        cap = None if self.cap_value is None else self.cap_value - add
        if self.money:
            return Demand(self.key, 0, amount, cap)
        return Demand(self.key, 1, 0, cap, self.new_only)


@dataclass(frozen=True, slots=True)
class LoopSpec:
    intent: str
    digest: bytes
    since: float  # hits after this moment count
    max: int | None  # refuse at this many hits already seen; None: counted, not enforced
    policy: Policy


@dataclass
class Admission:
    agent: str
    intent: str | None
    amount: int  # pico-USD reserved
    now: float
    demands: list[Demand]  # in key order: counter stores lock them in this order
    limits: Sequence[Limit]
    spend_keys: Sequence[CounterKey]  # every counter the call's cost goes to
    loop: LoopSpec | None = None
    # The least a limit that blocks would let the call reserve (its output cap clamped to
    # one token); None: the whole amount. Alert and dry-run limits count breaches by it.
    floor: int | None = None
    # The counters holding this call's reservation, limited ones first (see `reserving`).
    reserving: Sequence[CounterKey] = ()

    @property
    def intent_key(self) -> CounterKey | None:
        return intent_key(self.agent, self.intent) if self.intent is not None else None


def reserving(
    shapes: Iterable[_Shape], spend: Iterable[CounterKey], reserves: bool
) -> list[CounterKey]:
    """The counters a call's reservation is held on: its limited money counters (when it
    `reserves` an amount), then every other counter its cost goes to (views show them
    all)."""
    keys = [shape.key for shape in shapes if shape.money] if reserves else []
    seen = set(keys)
    return keys + [k for k in spend if k not in seen]


def minute_key(scope: str, at: float) -> CounterKey:
    start = float(math.floor(at / 60) * 60)
    return CounterKey(scope, MINUTE_KIND, start, start + 60)


def spend_keys(
    agent: str,
    intent: str | None,
    calendar: Calendar,
    at: float,
    user_scope: str | None = None,
    intent_minutes: bool = False,
) -> list[CounterKey]:
    """Every counter a call's cost goes to, limited or not (views show them all): the
    calendar windows, and the minute counters spend rates read. An end user's counters
    exist only while limits apply to them (customers can be many), an intent's minute
    counters only while a per-intent rate applies."""
    scopes = (agent_scope(agent), GLOBAL) if user_scope is None else (
        agent_scope(agent), GLOBAL, user_scope)  # fmt: skip
    keys = [
        CounterKey(scope, f"cost:{window}", *calendar.window(window, at))
        for scope in scopes
        for window in COST_WINDOWS
    ]
    keys += [minute_key(agent_scope(agent), at), minute_key(GLOBAL, at)]
    if intent_minutes and intent is not None:
        keys.append(minute_key(intent_scope(agent, intent), at))
    if intent is not None:
        keys.append(intent_key(agent, intent))
    return keys


def _memoized(
    plan: Plan, calendar: Calendar, now: float, key: tuple[object, ...],
    build: Callable[[], Iterable[T]],
) -> tuple[T, ...]:  # fmt: skip
    """What `build` returns for `key`, from the plan's memo. The memo is emptied whenever
    `now` is past the stretch it was filled in (a window started or ended), it grew past
    its bound, or another calendar asks. Admission and settling both need the same limits
    and counter keys for every call; building them (a window and a key per limit) was
    most of admission's time."""
    memo = plan.memo
    span = memo.get(_MEMO_SPAN)
    if (
        not isinstance(span, tuple)
        or span[0] is not calendar
        or not span[1] <= now < span[2]
        or len(memo) > _MEMO_MAX
    ):
        memo.clear()
        memo[_MEMO_SPAN] = (calendar, *calendar.stable_span(now))
    found = memo.get(key)
    if found is None:
        found = memo[key] = tuple(build())
    return cast(tuple[T, ...], found)


def plan_limits(
    plan: Plan,
    agent: str,
    intent: str | None,
    calendar: Calendar,
    now: float,
    *,
    counting: bool = True,
    views: bool = False,
    progress_mark: int = 0,
) -> tuple[Limit, ...]:
    """The limits that apply to a call of `agent` (under `intent`). `counting=False`
    leaves out the count limits (an extension of an admitted call, a standing check);
    `views=True` includes intent counts even without an intent (a status page).
    `progress_mark`: what the intent had spent at its last progress report."""
    return _memoized(
        plan, calendar, now, ("limits", agent, intent, counting, views, progress_mark),
        lambda: _limits(plan, agent, intent, calendar, now, counting, views, progress_mark),
    )  # fmt: skip


def _limits(
    plan: Plan,
    agent: str,
    intent: str | None,
    calendar: Calendar,
    now: float,
    counting: bool,
    views: bool,
    progress_mark: int,
) -> list[Limit]:
    out = []
    for app in plan.applicable:
        policy, action = app.policy, app.policy.action
        scope = app.counters
        for name, window in COST_LIMITS.items():
            if window in policy.cost:
                key = CounterKey(scope, f"cost:{window}", *calendar.window(window, now))
                out.append(Limit(app.scope, app.subject, name, True, policy.cost[window],
                                 action, key))  # fmt: skip
        if counting and policy.requests_per_minute is not None:
            key = CounterKey(scope, "requests:minute", *calendar.window("minute", now))
            out.append(Limit(app.scope, app.subject, REQUESTS_LIMIT, False,
                             policy.requests_per_minute, action, key))  # fmt: skip
        if counting and (intent is not None or views):
            for name, window in INTENT_LIMITS.items():
                if window in policy.intents:
                    key = CounterKey(scope, f"intents:{window}", *calendar.window(window, now))
                    out.append(Limit(app.scope, app.subject, name, False, policy.intents[window],
                                     action, key, new_only=True))  # fmt: skip
        if intent is not None and policy.cost_per_intent is not None:
            out.append(Limit("intent", intent, INTENT_COST_LIMIT, True, policy.cost_per_intent,
                             action, intent_key(agent, intent)))  # fmt: skip
        if intent is not None and policy.cost_without_progress is not None:
            # The same lifetime counter, its limit moved up by what was spent before the
            # last progress: the store checks it atomically like any other.
            out.append(Limit("intent", intent, PROGRESS_LIMIT, True,
                             policy.cost_without_progress + progress_mark, action,
                             intent_key(agent, intent), offset=progress_mark))  # fmt: skip
    return out


def _shapes(plan: Plan, agent: str, intent: str | None, limits: Sequence[Limit]) -> list[_Shape]:
    """The counters an admission touches, in key order (stores lock them in that order):
    what each adds, and its tightest refusing limit."""
    money: dict[CounterKey, bool] = {}
    new_only: dict[CounterKey, bool] = {}
    caps: dict[CounterKey, int | None] = {}
    for lim in limits:
        money[lim.key], new_only[lim.key] = lim.money, (not lim.money and lim.new_only)
        caps.setdefault(lim.key, None)
        if lim.action in REFUSING:
            old = caps[lim.key]
            caps[lim.key] = lim.value if old is None else min(old, lim.value)
    if intent is not None and any(a.policy.intents for a in plan.applicable):
        # Whether the intent is new is read from its lifetime counter.
        key = intent_key(agent, intent)
        money.setdefault(key, True)
        new_only.setdefault(key, False)
        caps.setdefault(key, None)
    ordered = sorted(money, key=lambda k: (k.scope, k.kind, k.start))
    return [_Shape(k, money[k], new_only[k], caps[k]) for k in ordered]


class _Parts(NamedTuple):
    """What an admission needs that its amount does not change: kept per plan and window
    in one memo entry (see `_memoized`)."""

    limits: Sequence[Limit]
    shapes: Sequence[_Shape]
    spend: Sequence[CounterKey]
    reserving: Sequence[CounterKey]


def _parts(
    plan: Plan, agent: str, intent: str | None, calendar: Calendar, now: float, counting: bool,
    free: bool, progress_mark: int, reserves: bool,
) -> _Parts:  # fmt: skip
    limits: Sequence[Limit] = plan_limits(
        plan, agent, intent, calendar, now, counting=counting, progress_mark=progress_mark
    )
    if free:
        limits = tuple(lim for lim in limits if not lim.money)
    shapes = _shapes(plan, agent, intent, limits)
    spend = _memoized(
        plan, calendar, now, ("spend", agent, intent),
        lambda: spend_keys(agent, intent, calendar, now, plan.user_scope, plan.rate_per_intent),
    )  # fmt: skip
    return _Parts(limits, tuple(shapes), spend, tuple(reserving(shapes, spend, reserves)))


def plan_admission(
    plan: Plan,
    agent: str,
    intent: str | None,
    amount: int,
    calendar: Calendar,
    now: float,
    digest: bytes | None = None,
    *,
    counting: bool = True,
    free: bool = False,
    progress_mark: int = 0,
) -> Admission:
    """The demands of one call: each limit's counter gets what the call adds (its cost
    reserved, or 1), capped at what the limit allows when the limit blocks or pauses.
    `counting=False`: an extension of an admitted call, or a standing check. `free`: a
    call that cannot spend (listing models, retrieving a result): money limits do not
    stop it, count limits and pauses do."""
    reserves = amount != 0
    ((limits, shapes, spend, held),) = _memoized(
        plan, calendar, now, ("admission", agent, intent, counting, free, progress_mark, reserves),
        lambda: (_parts(plan, agent, intent, calendar, now, counting, free, progress_mark,
                        reserves),),
    )  # fmt: skip
    demands = [shape.demand(amount) for shape in shapes]
    loop = None
    guard_policy = plan.loop_policy
    if counting and digest is not None and guard_policy is not None:
        guard = guard_policy.loop_guard
        assert guard is not None
        blocking = guard.max_identical_requests if guard_policy.refuses else None
        loop = LoopSpec(intent or "", digest, now - guard.window_seconds, blocking, guard_policy)
    return Admission(agent, intent, amount, now, demands, limits, spend, loop, reserving=held)


# -- the decision ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """A counter store's answer to an admission: whether every cap held (and so every
    demand was applied), and the counters as they were before it."""

    ok: bool
    new_intent: bool = False
    paused: bool = False
    paused_reason: str | None = None
    loop_seen: int = 0
    before: dict[CounterKey, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Check:
    scope: str  # "agent", "global" or "intent"
    subject: str  # the agent name, "global", or the intent id
    limit: str  # the limit's key, e.g. max_cost_per_day_usd
    money: bool  # True: values are pico-USD; False: counts
    limit_value: int
    used: int
    reserved: int
    amount: int  # what this call adds: its cost, or 1
    action: str
    resets_at: float | None  # None: lifetime (intent)
    note: str | None = None  # what the numbers mean, for limits they do not explain
    offset: int = 0  # spend not counted against the limit (before the last progress)
    floor: int | None = None  # see Admission.floor

    @property
    def remaining(self) -> int:
        return self.limit_value - self.used - self.reserved

    @property
    def breached(self) -> bool:
        return self.used + self.reserved + self.amount > self.limit_value

    @property
    def spent_out(self) -> bool:
        """Whether an alert or dry-run limit is reached as a limit that blocks would be: one
        that lets a call through with its output cap clamped to what is left, and refuses
        only when not even that fits (else every uncapped call would alert)."""
        if self.floor is None or not self.money:
            return self.breached
        return self.used + self.reserved + min(self.floor, self.amount) > self.limit_value


def checks(adm: Admission, outcome: Outcome, breached_only: bool = False) -> list[Check]:
    """A Check per limit; `breached_only`: only those the call breaches (the rest cannot
    refuse, alert or be a dry-run refusal, and most calls breach none)."""
    out = []
    for lim in adm.limits:
        if lim.new_only and not outcome.new_intent:
            continue
        used, reserved = outcome.before.get(lim.key, (0, 0))
        amount = adm.amount if lim.money else 1
        if breached_only and used + reserved + amount <= lim.value:
            continue
        out.append(Check(lim.scope, lim.subject, lim.name, lim.money, lim.value, used, reserved,
                         amount, lim.action, lim.resets_at, offset=lim.offset,
                         floor=adm.floor if lim.money else None))  # fmt: skip
    if adm.loop is not None and (guard := adm.loop.policy.loop_guard) is not None:
        out.append(Check("agent", adm.agent, LOOP_CODE, False, guard.max_identical_requests,
                         outcome.loop_seen, 0, 1, adm.loop.policy.action,
                         adm.now + guard.window_seconds))  # fmt: skip
    return out


def breaches(all_checks: Iterable[Check]) -> list[Check]:
    return [c for c in all_checks if c.breached and (c.action in REFUSING or c.spent_out)]


def decisive(breached: Sequence[Check]) -> Check | None:
    """The breach that refuses the call: pause before block; then the tightest remainder."""
    refusing = [c for c in breached if c.action in REFUSING]
    if not refusing:
        return None
    return min(refusing, key=lambda c: (c.action != "pause", not c.money, c.remaining))


@dataclass
class Decision:
    admitted: bool
    refusal: Check | None = None  # the limit that refused it (None: paused, or admitted)
    paused: bool = False  # refused because the agent is paused
    alerts: list[Check] = field(default_factory=list)  # alert-action breaches (let through)
    shadows: list[Check] = field(default_factory=list)  # dry-run limits that would refuse


def decide(adm: Admission, outcome: Outcome, extra: Sequence[Check] = ()) -> Decision:
    """What the store's answer means. `extra` are checks no store enforces (they only
    read counters): a refusing breach among them refuses a call the store admitted, and
    the caller must release its reservation."""
    breached = checks(adm, outcome, breached_only=True)
    if not breached and not extra and not outcome.paused:
        return Decision(outcome.ok)  # most calls: no limit near, nothing more to work out
    return decide_breached(breaches([*breached, *extra]), outcome)


def decide_breached(breached: Sequence[Check], outcome: Outcome) -> Decision:
    alerts = [c for c in breached if c.action == "alert"]
    shadows = [c for c in breached if c.action == "shadow"]
    if outcome.paused:
        return Decision(False, paused=True, alerts=alerts, shadows=shadows)
    refusal = decisive(breached)
    return Decision(outcome.ok and refusal is None, refusal, False, alerts, shadows)
