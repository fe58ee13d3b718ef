"""Budget enforcement in one process: atomic reserve and settle on in-memory counters.

Check and reserve run without an `await` between them, so on one event loop they are one
atomic step. Spend is rebuilt from the ledger at startup; reservations live only in memory,
so a crash can never leave one behind. (Several replicas share counters in PostgreSQL
instead: see `proxy.shared_enforcer`.)
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from proxy import events
from proxy.budgets import (
    COST_LIMITS,
    COST_WINDOWS,
    INTENT_COST_LIMIT,
    INTENT_LIMITS,
    LOOP_CODE,
    PAUSED_CODE,
    REQUESTS_LIMIT,
    Calendar,
    Check,
    LoopGuard,
    Policy,
    PolicySet,
    breaches,
    decisive,
    pause_reason,
    refusal_message,
)
from proxy.money import usd_exact
from proxy.storage import Storage

log = logging.getLogger("meterproxy.budgets")
_INTENT_WINDOWS = ("hour", "day")
_MAX_INTENTS_IN_MEMORY = 200_000
_MAX_LOOP_KEYS = 100_000


@dataclass(slots=True)
class Counter:
    start: float
    end: float
    used: int = 0
    reserved: int = 0
    key: Any = None  # the database counter it mirrors (shared budgets)


class Scope:
    """Counters of one agent, or of all agents together (global)."""

    __slots__ = ("cost", "intents", "name", "requests")

    def __init__(self, name: str) -> None:
        self.name = name
        self.cost: dict[str, Counter] = {}
        self.intents: dict[str, Counter] = {}
        self.requests: dict[str, Counter] = {}

    @staticmethod
    def _current(table: dict[str, Counter], kind: str, cal: Calendar, now: float) -> Counter:
        counter = table.get(kind)
        if counter is None or not counter.start <= now < counter.end:
            start, end = cal.window(kind, now)
            counter = Counter(start, end)
            table[kind] = counter
        return counter

    def cost_counter(self, kind: str, cal: Calendar, now: float) -> Counter:
        return self._current(self.cost, kind, cal, now)

    def intent_counter(self, kind: str, cal: Calendar, now: float) -> Counter:
        return self._current(self.intents, kind, cal, now)

    def request_counter(self, cal: Calendar, now: float) -> Counter:
        return self._current(self.requests, "minute", cal, now)


@dataclass(slots=True)
class IntentState:
    agent: str
    first_seen: float
    used: int = 0
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class _Plan:
    """What applies to one agent under the policies in force, worked out once."""

    applicable: tuple[tuple[str, str, Policy], ...]
    needs_estimate: bool
    loop_policy: Policy | None


@dataclass(slots=True)
class Ticket:
    """An admitted call's reservation; settled exactly once."""

    agent: str
    intent: str | None
    amount: int
    counters: list[Counter] = field(default_factory=list)
    intent_state: IntentState | None = None
    settled: bool = False
    lease: str | None = None  # shared budgets: the reservation's id in the database


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str
    message: str
    check: Check | None = None
    retry_after: int | None = None
    status: int = 429  # 503 when the budget database cannot be reached (fail closed)

    @property
    def remaining_pico(self) -> int | None:
        if self.check is None or not self.check.money:
            return None
        return max(self.check.remaining, 0)

    def headers(self) -> dict[str, str]:
        # A budget refusal stands until its window resets: the SDKs must not retry. An
        # unreachable budget database is transient: they should.
        retry = "true" if self.status == 503 else "false"
        headers = {"x-should-retry": retry, "x-meter-limit": self.code}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        remaining = self.remaining_pico
        if remaining is not None:
            headers["x-meter-remaining-usd"] = usd_exact(remaining)
        return headers


class BudgetState:
    """Counters, intents, pauses and loop-guard hits: in memory for one process, or built
    for one admission from counters locked in the database (several replicas)."""

    def __init__(self) -> None:
        self.global_scope = Scope("global")
        self.agents: dict[str, Scope] = {}
        self.intents: OrderedDict[str, IntentState] = OrderedDict()
        self.paused: dict[str, str | None] = {}
        self.loops: dict[tuple[str, str, bytes], deque[float]] = {}

    def scope(self, agent: str) -> Scope:
        scope = self.agents.get(agent)
        if scope is None:
            scope = self.agents[agent] = Scope(agent)
        return scope

    def remember(self, intent: str, state: IntentState) -> None:
        self.intents[intent] = state
        if len(self.intents) > _MAX_INTENTS_IN_MEMORY:
            for key in list(self.intents)[: _MAX_INTENTS_IN_MEMORY // 10]:
                if self.intents[key].reserved == 0:  # its rows are long committed
                    del self.intents[key]


class Enforcer:
    def __init__(
        self,
        calendar: Calendar,
        policies: PolicySet,
        bus: events.EventBus,
        storage: Storage | None = None,
        thresholds: tuple[float, ...] = (0.5, 0.8, 1.0),
    ) -> None:
        self.calendar = calendar
        self._plans: dict[str, _Plan] = {}
        self.policies = policies
        self.bus = bus
        self.storage = storage
        self.thresholds = tuple(sorted(thresholds))
        self.state = BudgetState()
        self._fired: set[tuple[Any, ...]] = set()
        self.outstanding = 0  # tickets not yet settled
        self.outstanding_pico = 0

    # -- state ------------------------------------------------------------------------

    @property
    def global_scope(self) -> Scope:
        return self.state.global_scope

    @property
    def agents(self) -> dict[str, Scope]:
        return self.state.agents

    @property
    def intents(self) -> OrderedDict[str, IntentState]:
        return self.state.intents

    @property
    def paused(self) -> dict[str, str | None]:
        return self.state.paused

    @paused.setter
    def paused(self, paused: dict[str, str | None]) -> None:
        self.state.paused = paused

    def scope(self, agent: str) -> Scope:
        return self.state.scope(agent)

    async def load(self, storage: Storage, now: float) -> None:
        """Rebuild spend per window and paused agents from the ledger."""
        cal = self.calendar
        for kind in COST_WINDOWS:
            start, _ = cal.window(kind, now)
            by_agent = await storage.cost_by_agent_since(int(start))
            for agent, cost in by_agent.items():
                self.scope(agent).cost_counter(kind, cal, now).used = cost
            self.global_scope.cost_counter(kind, cal, now).used = sum(by_agent.values())
        for kind in _INTENT_WINDOWS:
            start, _ = cal.window(kind, now)
            started = await storage.intents_started_since(start)
            for agent, n in started.items():
                self.scope(agent).intent_counter(kind, cal, now).used = n
            self.global_scope.intent_counter(kind, cal, now).used = sum(started.values())
        start, _ = cal.window("minute", now)
        requests = await storage.requests_by_agent_since(start)
        for agent, n in requests.items():
            self.scope(agent).request_counter(cal, now).used = n
        self.global_scope.request_counter(cal, now).used = sum(requests.values())
        self.paused = await storage.paused_agents()

    async def _load_intent(self, intent: str) -> None:
        if intent in self.intents or self.storage is None:
            return
        row = await self.storage.intent(intent)
        if row is not None and intent not in self.intents:
            self.state.remember(intent, IntentState(row.agent, row.first_seen, row.cost_pico))

    # -- what applies to an agent -----------------------------------------------------

    @property
    def policies(self) -> PolicySet:
        return self._policy_set

    @policies.setter
    def policies(self, policies: PolicySet) -> None:
        self._policy_set = policies
        self._plans = {}  # what applies to each agent is worked out again, once

    def _plan(self, agent: str) -> _Plan:
        plan = self._plans.get(agent)
        if plan is None:
            applicable = []
            policy, _ = self._policy_set.for_agent(agent)
            if policy is not None:
                applicable.append(("agent", agent, policy))
            g = self._policy_set.global_policy
            if g is not None:
                applicable.append(("global", "global", g))
            loop = None
            if policy is not None and policy.loop_guard is not None:
                loop = policy
            elif g is not None and g.loop_guard is not None:
                loop = g
            plan = _Plan(tuple(applicable), any(p.has_cost_limit for _, _, p in applicable), loop)
            if len(self._plans) < 100_000:
                self._plans[agent] = plan
        return plan

    def _policies(self, agent: str) -> tuple[tuple[str, str, Policy], ...]:
        return self._plan(agent).applicable

    def needs_estimate(self, agent: str) -> bool:
        """Whether admission needs the call's worst-case cost (a cost limit applies)."""
        return self._plan(agent).needs_estimate

    def _loop_policy(self, agent: str) -> Policy | None:
        """The policy whose loop guard applies: the agent's own, else the global one."""
        return self._plan(agent).loop_policy

    def loop_guard(self, agent: str) -> LoopGuard | None:
        policy = self._plan(agent).loop_policy
        return policy.loop_guard if policy is not None else None

    # -- admission --------------------------------------------------------------------

    async def admit(
        self,
        agent: str,
        intent: str | None,
        worst_case: int,
        now: float,
        digest: bytes | None = None,
        call_id: str | None = None,  # the call's ledger id (names a shared reservation)
    ) -> Ticket | Refusal:
        if intent is not None and intent not in self.intents:
            await self._load_intent(intent)
        result = self._admit_now(self.state, agent, intent, worst_case, now, digest)
        if isinstance(result, Refusal) and result.check and result.check.action == "pause":
            await self.persist_pause(agent, now)
        if isinstance(result, Ticket):
            self.outstanding += 1
            self.outstanding_pico += worst_case
        return result

    def _admit_now(
        self,
        st: BudgetState,
        agent: str,
        intent: str | None,
        worst_case: int,
        now: float,
        digest: bytes | None,
    ) -> Ticket | Refusal:
        """Check and reserve: no await in here, so this is one atomic step on the loop (or
        inside the database transaction that locked the counters `st` was built from)."""
        if agent in st.paused:
            return self._paused_refusal(st, agent)
        cal = self.calendar
        scope = st.scope(agent)
        new_intent = intent is not None and intent not in st.intents
        intent_state = st.intents.get(intent) if intent is not None else None
        checks = list(
            self._checks(st, agent, scope, intent, intent_state, new_intent, worst_case, now)
        )
        loop_policy = self._loop_policy(agent)
        if loop_policy is not None and digest is not None:
            checks.append(self._loop_check(st, agent, intent, digest, loop_policy, now))
        breached = breaches(checks)
        if breached:
            refusal = self._on_breaches(st, agent, breached, now)
            if refusal is not None:
                return refusal
        # Reserve on every window, limited or not: spend is tracked for all agents.
        ticket = Ticket(agent, intent, worst_case)
        for s in (scope, st.global_scope):
            for kind in COST_WINDOWS:
                counter = s.cost_counter(kind, cal, now)
                counter.reserved += worst_case
                ticket.counters.append(counter)
            s.request_counter(cal, now).used += 1
            if new_intent:
                for kind in _INTENT_WINDOWS:
                    s.intent_counter(kind, cal, now).used += 1
        if intent is not None:
            if intent_state is None:
                intent_state = IntentState(agent, now)
                st.remember(intent, intent_state)
            else:
                st.intents.move_to_end(intent)
            intent_state.reserved += worst_case
            ticket.intent_state = intent_state
        return ticket

    def _checks(
        self,
        st: BudgetState,
        agent: str,
        scope: Scope,
        intent: str | None,
        intent_state: IntentState | None,
        new_intent: bool,
        amount: int,
        now: float,
    ) -> Iterator[Check]:
        cal = self.calendar
        for kind, subject, policy in self._policies(agent):
            s = scope if kind == "agent" else st.global_scope
            action = policy.action
            for limit, window in COST_LIMITS.items():
                if window in policy.cost:
                    c = s.cost_counter(window, cal, now)
                    yield Check(
                        kind, subject, limit, True, policy.cost[window],
                        c.used, c.reserved, amount, action, c.end,
                    )  # fmt: skip
            if new_intent:
                for limit, window in INTENT_LIMITS.items():
                    if window in policy.intents:
                        c = s.intent_counter(window, cal, now)
                        yield Check(
                            kind, subject, limit, False, policy.intents[window],
                            c.used, 0, 1, action, c.end,
                        )  # fmt: skip
            if policy.requests_per_minute is not None:
                c = s.request_counter(cal, now)
                yield Check(
                    kind, subject, REQUESTS_LIMIT, False, policy.requests_per_minute,
                    c.used, 0, 1, action, c.end,
                )  # fmt: skip
            if intent is not None and policy.cost_per_intent is not None:
                used = intent_state.used if intent_state else 0
                reserved = intent_state.reserved if intent_state else 0
                yield Check(
                    "intent", intent, INTENT_COST_LIMIT, True, policy.cost_per_intent,
                    used, reserved, amount, action, None,
                )  # fmt: skip

    def _loop_check(
        self,
        st: BudgetState,
        agent: str,
        intent: str | None,
        digest: bytes,
        policy: Policy,
        now: float,
    ) -> Check:
        guard = policy.loop_guard
        assert guard is not None
        key = (agent, intent or "", digest)
        hits = st.loops.get(key)
        if hits is None:
            if len(st.loops) >= _MAX_LOOP_KEYS:
                _prune_loops(st.loops, now)
            hits = st.loops[key] = deque()
        while hits and hits[0] <= now - guard.window_seconds:
            hits.popleft()
        seen = len(hits)
        hits.append(now)  # refused attempts count too: a loop stays stopped while it runs
        return Check(
            "agent", agent, LOOP_CODE, False, guard.max_identical_requests,
            seen, 0, 1, policy.action, now + guard.window_seconds,
        )  # fmt: skip

    def _emit(self, event: events.Event) -> None:
        """Events go through here: the shared enforcer holds them until its commit."""
        self.bus.emit(event)

    def _on_breaches(
        self, st: BudgetState, agent: str, breached: list[Check], now: float
    ) -> Refusal | None:
        for alert in breached:
            if alert.action == "alert":
                message = refusal_message(alert, self.calendar, now)
                log.warning("budget alert (call allowed): %s", message)
                self._emit(events.Event(events.ALERT, message, now, agent, _check_data(alert)))
        check = decisive(breached)
        if check is None:
            return None
        message = refusal_message(check, self.calendar, now)
        if check.limit == LOOP_CODE:
            self._emit(events.Event(events.LOOP, message, now, agent, _check_data(check)))
        if check.action == "pause":
            st.paused[agent] = pause_reason(check, self.calendar, now)
            message += f". Agent '{agent}' is now paused until resumed through the admin API"
            self._emit(events.Event(events.PAUSED, message, now, agent, _check_data(check)))
        self._emit(events.Event(events.REFUSED, message, now, agent, _check_data(check)))
        retry = max(math.ceil(check.resets_at - now), 1) if check.resets_at is not None else None
        if check.action == "pause":
            retry = None
        return Refusal(check.limit, message, check, retry)

    def _paused_refusal(self, st: BudgetState, agent: str) -> Refusal:
        reason = st.paused.get(agent)
        message = f"agent '{agent}' is paused"
        message += f" ({reason})" if reason else ""
        message += "; resume it through the admin API (POST /meter/agents/{agent}/resume)"
        return Refusal(PAUSED_CODE, message.replace("{agent}", agent))

    # -- settlement -------------------------------------------------------------------

    def settle(self, ticket: Ticket, actual: int | None, now: float) -> None:
        """Replace the reservation with the actual cost (None: unpriced, counts as 0)."""
        if ticket.settled:
            return
        ticket.settled = True
        cost = actual or 0
        for counter in ticket.counters:
            counter.reserved -= ticket.amount
            counter.used += cost
        if ticket.intent_state is not None:
            ticket.intent_state.reserved -= ticket.amount
            ticket.intent_state.used += cost
        self.outstanding -= 1
        self.outstanding_pico -= ticket.amount
        if cost > ticket.amount and ticket.amount:
            log.warning(
                "call of agent '%s' cost %s USD, more than its reservation of %s USD",
                ticket.agent,
                usd_exact(cost),
                usd_exact(ticket.amount),
            )
        if cost:
            self._crossings(ticket.agent, ticket.intent, now)

    async def add_reported(self, agent: str, intent: str | None, cost: int, now: float) -> None:
        """Spend reported out of band (heartbeat): no reservation, counted at once."""
        self._add_reported(self.state, agent, intent, cost, now)
        self._crossings(agent, intent, now)

    def _add_reported(
        self, st: BudgetState, agent: str, intent: str | None, cost: int, now: float
    ) -> None:
        cal = self.calendar
        new_intent = intent is not None and intent not in st.intents
        for s in (st.scope(agent), st.global_scope):
            for kind in COST_WINDOWS:
                s.cost_counter(kind, cal, now).used += cost
            if new_intent:
                for kind in _INTENT_WINDOWS:
                    s.intent_counter(kind, cal, now).used += 1
        if intent is not None:
            state = st.intents.get(intent)
            if state is None:
                state = IntentState(agent, now)
                st.remember(intent, state)
            state.used += cost

    def _crossings(self, agent: str, intent: str | None, now: float) -> None:
        """Threshold events (once per limit, window and threshold), and pauses on a breach."""
        scope = self.scope(agent)
        for kind, subject, policy in self._policies(agent):
            s = scope if kind == "agent" else self.global_scope
            for limit, window in COST_LIMITS.items():
                if window in policy.cost:
                    c = s.cost_counter(window, self.calendar, now)
                    self._threshold(kind, subject, limit, policy, c.used, policy.cost[window],
                                    c.start, now, agent)  # fmt: skip
            if intent is not None and policy.cost_per_intent is not None:
                state = self.intents.get(intent)
                if state is not None:
                    self._threshold("intent", intent, INTENT_COST_LIMIT, policy, state.used,
                                    policy.cost_per_intent, 0.0, now, agent)  # fmt: skip

    def _threshold(
        self,
        scope: str,
        subject: str,
        limit: str,
        policy: Policy,
        used: int,
        limit_value: int,
        window_start: float,
        now: float,
        agent: str,
    ) -> None:
        if limit_value <= 0:
            return
        for threshold in self.thresholds:
            if used < threshold * limit_value:
                break
            key = (scope, subject, limit, window_start, threshold)
            if key in self._fired:
                continue
            self._fired.add(key)
            if len(self._fired) > 100_000:
                self._fired = {k for k in self._fired if k[3] >= window_start}
            pct = round(threshold * 100)
            who = "all agents" if scope == "global" else f"{scope} '{subject}'"
            message = (
                f"{who} has used {pct}% of {limit}: ${usd_exact(used)} of ${usd_exact(limit_value)}"
            )
            self._fire_threshold(
                key,
                events.Event(
                    events.THRESHOLD,
                    message,
                    now,
                    agent,
                    {
                        "scope": scope,
                        "subject": subject,
                        "limit": limit,
                        "threshold": threshold,
                        "used_usd": usd_exact(used),
                        "limit_usd": usd_exact(limit_value),
                        "window_start": window_start,
                    },
                ),
            )

    def _fire_threshold(self, key: tuple[Any, ...], event: events.Event) -> None:
        """Once per process; the shared enforcer makes it once across replicas."""
        self._emit(event)

    async def standing(self, agent: str, intent: str | None, now: float) -> Refusal | None:
        """Whether the agent may go on spending (heartbeat answer): None when it may.

        A cost limit with nothing left refuses; a `pause` limit reached pauses the agent.
        """
        refusal = self._standing(self.state, agent, intent, now)
        if refusal is not None and refusal.check and refusal.check.action == "pause":
            await self.persist_pause(agent, now)
        return refusal

    def _standing(
        self, st: BudgetState, agent: str, intent: str | None, now: float
    ) -> Refusal | None:
        if agent in st.paused:
            return self._paused_refusal(st, agent)
        state = st.intents.get(intent) if intent is not None else None
        over = [
            c
            for c in self._checks(st, agent, st.scope(agent), intent, state, False, 0, now)
            if c.money and c.used + c.reserved >= c.limit_value
        ]
        if not over:
            return None
        return self._on_breaches(st, agent, over, now)

    # -- pause and resume -------------------------------------------------------------

    async def persist_pause(self, agent: str, now: float) -> None:
        if self.storage is not None:
            await self.storage.set_paused(agent, True, self.paused.get(agent), now)

    async def pause(self, agent: str, reason: str | None, now: float) -> None:
        self.paused[agent] = reason
        await self.persist_pause(agent, now)
        self.bus.emit(events.Event(events.PAUSED, f"agent '{agent}' paused: {reason}", now, agent))

    async def resume(self, agent: str, now: float) -> bool:
        was = agent in self.paused
        self.paused.pop(agent, None)
        if self.storage is not None:
            await self.storage.set_paused(agent, False, None, now)
        if was:
            self.bus.emit(events.Event(events.RESUMED, f"agent '{agent}' resumed", now, agent))
        return was

    # -- read-only views ----------------------------------------------------------------

    def remaining(self, now: float) -> Iterator[tuple[str, str, str, int]]:
        """(scope, agent, limit, pico-USD left) for every cost limit in force."""
        cal = self.calendar
        names = set(self.agents) | self.policies.names() | set(self.paused)
        for agent in sorted(names):
            policy, _ = self.policies.for_agent(agent)
            if policy is None:
                continue
            scope = self.scope(agent)
            for limit, window in COST_LIMITS.items():
                if window in policy.cost:
                    c = scope.cost_counter(window, cal, now)
                    yield "agent", agent, limit, max(policy.cost[window] - c.used - c.reserved, 0)
        g = self.policies.global_policy
        if g is not None:
            for limit, window in COST_LIMITS.items():
                if window in g.cost:
                    c = self.global_scope.cost_counter(window, cal, now)
                    yield "global", "", limit, max(g.cost[window] - c.used - c.reserved, 0)

    def spent(self, agent: str, window: str, now: float) -> int:
        return self.scope(agent).cost_counter(window, self.calendar, now).used

    def status(self, agent: str, now: float) -> dict[str, Any]:
        cal = self.calendar
        scope = self.scope(agent)
        policy, source = self.policies.for_agent(agent)
        windows = {}
        for window in COST_WINDOWS:
            c = scope.cost_counter(window, cal, now)
            windows[window] = {
                "spent_usd": usd_exact(c.used),
                "reserved_usd": usd_exact(c.reserved),
                "starts": cal.iso(c.start),
                "resets": cal.iso(c.end),
            }
        limits = []
        for kind, _, p in self._policies(agent):
            s = scope if kind == "agent" else self.global_scope
            for limit, window in COST_LIMITS.items():
                if window in p.cost:
                    c = s.cost_counter(window, cal, now)
                    limits.append(_limit_view(kind, limit, p, p.cost[window], c, True, cal))
            for limit, window in INTENT_LIMITS.items():
                if window in p.intents:
                    c = s.intent_counter(window, cal, now)
                    limits.append(_limit_view(kind, limit, p, p.intents[window], c, False, cal))
            if p.requests_per_minute is not None:
                c = s.request_counter(cal, now)
                limits.append(
                    _limit_view(kind, REQUESTS_LIMIT, p, p.requests_per_minute, c, False, cal)
                )
        return {
            "agent": agent,
            "state": "paused" if agent in self.paused else "active",
            "paused_reason": self.paused.get(agent),
            "policy_source": source,
            "policy": policy.to_json() if policy is not None else None,
            "windows": windows,
            "limits": limits,
        }


def _limit_view(
    scope: str, limit: str, policy: Policy, value: int, c: Counter, money: bool, cal: Calendar
) -> dict[str, Any]:
    remaining = value - c.used - c.reserved
    view: dict[str, Any] = {"scope": scope, "limit": limit, "action": policy.action}
    if money:
        view |= {
            "limit_usd": usd_exact(value),
            "spent_usd": usd_exact(c.used),
            "reserved_usd": usd_exact(c.reserved),
            "remaining_usd": usd_exact(max(remaining, 0)),
        }
    else:
        view |= {"limit": limit, "max": value, "used": c.used, "remaining": max(remaining, 0)}
    view["resets"] = cal.iso(c.end)
    return view


def _prune_loops(loops: dict[tuple[str, str, bytes], deque[float]], now: float) -> None:
    horizon = 3600.0
    for key in [k for k, hits in loops.items() if not hits or hits[-1] < now - horizon]:
        del loops[key]
    if len(loops) >= _MAX_LOOP_KEYS:  # all recent: drop the oldest tenth
        for key in list(loops)[: _MAX_LOOP_KEYS // 10]:
            del loops[key]


def _check_data(check: Check) -> dict[str, Any]:
    data: dict[str, Any] = {
        "scope": check.scope,
        "subject": check.subject,
        "limit": check.limit,
        "action": check.action,
    }
    if check.money:
        data |= {"used_usd": usd_exact(check.used), "limit_usd": usd_exact(check.limit_value)}
    else:
        data |= {"used": check.used, "max": check.limit_value}
    return data
