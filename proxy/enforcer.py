"""Budget enforcement: admission, extension and settlement of calls, on a counter store.

The decision is pure (`proxy.admission`); the counters live in a store (`proxy.counters`:
memory for one process, PostgreSQL for replicas). This class joins them: it plans each
call's demands under the policies in force, asks the store, reads the answer, and says
what happened on the event bus (refusals, alerts, pauses, thresholds). Read-only views
(status pages, metrics) are in `proxy.budget_views`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from proxy import events
from proxy.admission import (
    Admission,
    Check,
    Decision,
    Plan,
    agent_scope,
    checks,
    decide,
    decide_breached,
    intent_key,
    make_plan,
    plan_admission,
    plan_limits,
    spend_keys,
)
from proxy.counters import CounterStore, MemoryCounters, Ticket
from proxy.crossings import Crossings
from proxy.money import usd_exact
from proxy.outcomes import ProgressBook
from proxy.policy import LOOP_CODE, PAUSED_CODE, REFUSING, PolicySet
from proxy.refusals import pause_reason, refusal_message, retry_after
from proxy.spend_rate import Baselines, RateWatch
from proxy.storage.base import CounterKey, StorageUnavailable
from proxy.windows import Calendar

log = logging.getLogger("meterproxy.budgets")
UNAVAILABLE_CODE = "meter_unavailable"
RETRY_SECONDS = 1.0  # after a failed connection, admissions skip the database this long
_MAX_PLANS = 100_000


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


class Enforcer:
    def __init__(
        self,
        calendar: Calendar,
        policies: PolicySet,
        bus: events.EventBus,
        store: CounterStore | None = None,
        thresholds: tuple[float, ...] = (0.5, 0.8, 1.0),
        *,
        on_error: str = "closed",
        rates: RateWatch | None = None,
        progress: ProgressBook | None = None,
        runway_seconds: float = 3600.0,
    ) -> None:
        self.calendar = calendar
        self.rates = rates if rates is not None else RateWatch(Baselines(None, calendar))
        self.progress = progress if progress is not None else ProgressBook(None)
        self._plans: dict[tuple[str, str | None], Plan] = {}
        self.policies = policies
        self.bus = bus
        self.store: CounterStore = store if store is not None else MemoryCounters()
        self.crossings = Crossings(calendar, bus, thresholds, runway_seconds)
        self.on_error = on_error
        self.outstanding = 0  # tickets not yet settled
        self.outstanding_pico = 0
        self.database_down = False
        self._retry_at = 0.0  # monotonic: before it, do not try the database

    @property
    def shared(self) -> bool:
        return self.store.shared

    @property
    def paused(self) -> dict[str, str | None]:
        return self.store.paused

    # -- what applies to an agent -------------------------------------------------------

    @property
    def policies(self) -> PolicySet:
        return self._policy_set

    @policies.setter
    def policies(self, policies: PolicySet) -> None:
        self._policy_set = policies
        self._plans = {}  # what applies to each agent is worked out again, once

    def plan(self, agent: str, user: str | None = None) -> Plan:
        """What applies to the agent's calls (for one of its end users)."""
        if user is not None and not self._policy_set.has_user_limits:
            user = None  # one plan per agent when no end user has limits
        plan = self._plans.get((agent, user))
        if plan is None:
            plan = make_plan(self._policy_set, agent, user)
            if len(self._plans) < _MAX_PLANS:
                self._plans[(agent, user)] = plan
        return plan

    def user_limited(self, agent: str, user: str | None) -> str | None:
        """The scope of an end user's counters, when limits apply to them."""
        return self.plan(agent, user).user_scope if user is not None else None

    def needs_estimate(self, agent: str, user: str | None = None) -> bool:
        """Whether admission needs the call's cost (a cost limit applies)."""
        return self.plan(agent, user).needs_estimate

    def headroom(
        self, agent: str, intent: str | None, now: float, user: str | None = None
    ) -> int | None:
        """What the tightest money limit that refuses still allows, as this process sees it
        (None: no such limit). A hint for sizing a call; admission decides atomically."""
        tightest = None
        plan = self.plan(agent, user)
        mark = self.progress.known(agent, intent) if plan.progress and intent else 0
        for lim in plan_limits(plan, agent, intent, self.calendar, now, counting=False,
                               progress_mark=mark):  # fmt: skip
            if lim.money and lim.action in REFUSING:
                used, reserved = self.store.value(lim.key)
                left = max(lim.value - used - reserved, 0)
                tightest = left if tightest is None else min(tightest, left)
        return tightest

    def loop_guard_applies(self, agent: str) -> bool:
        return self.plan(agent).loop_policy is not None

    # -- admission --------------------------------------------------------------------

    async def admit(
        self,
        agent: str,
        intent: str | None,
        amount: int,
        now: float,
        digest: bytes | None = None,
        call_id: str | None = None,  # the call's ledger id: names a shared reservation
        free: bool = False,  # it cannot spend: money limits do not stop it
        user: str | None = None,  # the agent's end user the call is for
        floor: int | None = None,  # see Admission.floor
    ) -> Ticket | Refusal:
        plan = self.plan(agent, user)
        mark = await self._mark(plan, agent, intent, now)
        adm = plan_admission(plan, agent, intent, amount, self.calendar, now, digest, free=free,
                             progress_mark=mark)  # fmt: skip
        adm.floor = floor
        if self.store.shared:
            if call_id is None:
                # The row's commit releases the lease it names: any other name would hold
                # budget for as long as the replica lives.
                raise ValueError("shared budgets need the call's ledger id (call_id)")
            if time.monotonic() < self._retry_at:
                return self._offline(plan, adm, None)
        try:
            await self.store.prepare(adm)
            if plan.rates:
                await self.rates.prepare(plan, agent, now)
            outcome = await self.store.admit(adm, call_id or "")
        except StorageUnavailable as e:
            return self._offline(plan, adm, e)
        self._back_online()
        extra = list(self.rates.checks(plan, self.store, agent, intent, now)) if plan.rates else []
        decision = decide(adm, outcome, extra)
        ticket = None
        if outcome.ok:
            ticket = Ticket(agent, intent, amount, self.store.ticket_keys(adm), adm.spend_keys,
                            user=user)  # fmt: skip
            ticket.shadow = decision.shadows[0].limit if decision.shadows else None
            if self.store.shared and amount and ticket.keys:
                ticket.lease = call_id
            self.outstanding += 1
            self.outstanding_pico += amount
        if decision.admitted and not decision.alerts and not decision.shadows:
            refusal = None  # most calls: nothing to say, not even a coroutine to run
        else:
            refusal = await self._conclude(adm, decision, now)
        if refusal is not None:
            if ticket is not None:  # admitted by the store, refused by a check it cannot make
                await self._give_back(ticket)
            return refusal
        assert ticket is not None
        return ticket

    async def _conclude(self, adm: Admission, decision: Decision, now: float) -> Refusal | None:
        """Say what the decision means: alerts, dry-run refusals, the refusal and a pause."""
        agent = adm.agent
        for check in decision.alerts:
            message = refusal_message(check, self.calendar, now)
            log.warning("budget alert (call allowed): %s", message)
            self.bus.emit(events.Event(events.ALERT, message, now, agent, check_data(check)))
        for check in decision.shadows:
            message = refusal_message(check, self.calendar, now)
            log.warning("budget dry run (call allowed): would refuse: %s", message)
            self.bus.emit(events.Event(events.SHADOW, message, now, agent, check_data(check)))
        if decision.admitted:
            return None
        if decision.paused:
            return self._paused_refusal(agent)
        if decision.refusal is None:
            # The store refused and no limit explains it: a pause or a limit that changed
            # between the two. The store's answer stands.
            log.error("budgets: agent '%s' refused with no breached limit to name", agent)
            return Refusal("budget_exceeded", f"agent '{agent}' has reached a limit")
        check = decision.refusal
        message = refusal_message(check, self.calendar, now)
        if check.limit == LOOP_CODE:
            self.bus.emit(events.Event(events.LOOP, message, now, agent, check_data(check)))
        if check.action == "pause":
            reason = pause_reason(check, self.calendar, now)
            await self.store.set_paused(agent, True, reason, now)
            message += f". Agent '{agent}' is now paused until resumed through the admin API"
            log.warning("budgets: agent '%s' paused: %s", agent, reason)
            self.bus.emit(events.Event(events.PAUSED, message, now, agent, check_data(check)))
        self.bus.emit(events.Event(events.REFUSED, message, now, agent, check_data(check)))
        return Refusal(check.limit, message, check, retry_after(check, now))

    async def _mark(self, plan: Plan, agent: str, intent: str | None, now: float) -> int:
        """What the intent had spent at its last progress report, when a limit needs it."""
        if not plan.progress or intent is None:
            return 0
        try:
            return await self.progress.mark(agent, intent, now)
        except StorageUnavailable:
            return 0  # the limit then counts from the intent's start: it refuses early

    async def record_progress(self, agent: str, intent: str, now: float) -> int:
        """The intent reported progress: what it spent until now no longer counts toward
        max_cost_per_intent_without_progress_usd. Returns that spend."""
        key = intent_key(agent, intent)
        if self.store.holds(key):
            spent = self.store.value(key)[0]
        else:  # not in this process's view (a restart, another replica): the ledger's total
            spent = await self.progress.spent(agent, intent)
        await self.progress.progressed(agent, intent, spent, now)
        return spent

    def _paused_refusal(self, agent: str) -> Refusal:
        reason = self.store.paused.get(agent)
        message = f"agent '{agent}' is paused"
        message += f" ({reason})" if reason else ""
        message += f"; resume it through the admin API (POST /meter/agents/{agent}/resume)"
        return Refusal(PAUSED_CODE, message)

    async def _give_back(self, ticket: Ticket) -> None:
        ticket.settled = True
        self.outstanding -= 1
        self.outstanding_pico -= ticket.amount
        try:
            await self.store.release(ticket)
        except StorageUnavailable as e:  # its row never comes: upkeep of dead leases is moot
            log.error("budgets: could not give back a reservation (%s)", e)

    async def extend(self, ticket: Ticket, amount: int, now: float) -> Refusal | None:
        """More reservation for an admitted call that runs on (a stream): None when the
        budget covers `amount` more, else the limit that does not."""
        plan = self.plan(ticket.agent, ticket.user)
        adm = plan_admission(plan, ticket.agent, ticket.intent, amount, self.calendar, now,
                             counting=False)  # fmt: skip
        try:
            outcome = await self.store.extend(ticket, adm)
        except StorageUnavailable as e:
            offline = self._offline(plan, adm, e)
            return offline if isinstance(offline, Refusal) else None
        if outcome.ok:
            self.outstanding_pico += amount
            return None
        decision = decide(adm, outcome)
        if decision.paused:
            return self._paused_refusal(ticket.agent)
        check = decision.refusal
        if check is None:
            return Refusal("budget_exceeded", f"agent '{ticket.agent}' has reached a limit")
        return Refusal(check.limit, refusal_message(check, self.calendar, now), check,
                       retry_after(check, now))  # fmt: skip

    async def transfer(self, ticket: Ticket, lease: str) -> None:
        """Hold an admitted call's reservation under another name (a background response's
        completion row), past the commit of the row that named it."""
        try:
            await self.store.transfer(ticket, lease)
        except StorageUnavailable as e:
            log.error("budgets: could not keep a background response's reservation (%s)", e)

    # -- the database away (shared budgets) ----------------------------------------------

    def _offline(self, plan: Plan, adm: Admission, error: Exception | None) -> Ticket | Refusal:
        if error is not None:
            if not self.database_down:
                log.error(
                    "budget database unreachable (%s): calls of agents under a block limit"
                    " are %s until it is back", error,
                    "refused (503)" if self.on_error == "closed" else "let through",
                )  # fmt: skip
            self.database_down = True
            self._retry_at = time.monotonic() + RETRY_SECONDS
        if self.on_error == "closed" and plan.refuses:
            return Refusal(
                UNAVAILABLE_CODE,
                "meterproxy: the budget database cannot be reached and agent"
                f" '{adm.agent}' has a block budget: its calls are refused until the database"
                " is back (storage.on_storage_error: closed)",
                retry_after=int(RETRY_SECONDS) + 1,
                status=503,
            )
        self.outstanding += 1
        # Counted when replayed.
        return Ticket(adm.agent, adm.intent, 0, [], adm.spend_keys, user=plan_user(plan))

    def _back_online(self) -> None:
        if self.database_down:
            log.warning("budget database reachable again")
            self.database_down = False

    # -- settlement -------------------------------------------------------------------

    def settle(self, ticket: Ticket, actual: int | None, now: float) -> None:
        """Replace the reservation with the actual cost (None: unpriced, counts as 0)."""
        if ticket.settled:
            return
        ticket.settled = True
        cost = actual or 0
        self.store.settle(ticket, cost)
        self.outstanding -= 1
        self.outstanding_pico -= ticket.amount
        if cost > ticket.amount and ticket.amount:
            log.warning(
                "call of agent '%s' cost %s USD, more than its reservation of %s USD",
                ticket.agent, usd_exact(cost), usd_exact(ticket.amount),
            )  # fmt: skip
        if cost:
            self.crossings.after_spend(
                self.store, self.plan(ticket.agent), ticket.agent, ticket.intent, now
            )

    async def add_reported(self, agent: str, intent: str | None, cost: int, now: float) -> None:
        """Spend reported out of band (heartbeat): no reservation, counted at once. (Shared
        budgets count it in the database with the heartbeat's row.)"""
        self.store.add_spend(spend_keys(agent, intent, self.calendar, now), cost)
        if cost:
            self.crossings.after_spend(self.store, self.plan(agent), agent, intent, now)

    async def standing(self, agent: str, intent: str | None, now: float) -> Refusal | None:
        """Whether the agent may go on spending (a heartbeat's answer): None when it may.
        A cost limit with nothing left refuses; a `pause` limit reached pauses the agent."""
        plan = self.plan(agent)
        mark = await self._mark(plan, agent, intent, now)
        adm = plan_admission(plan, agent, intent, 0, self.calendar, now, counting=False,
                             progress_mark=mark)  # fmt: skip
        try:
            await self.store.prepare(adm)
            outcome = await self.store.read(adm)
        except StorageUnavailable as e:
            offline = self._offline(plan, adm, e)
            if isinstance(offline, Ticket):
                self.outstanding -= 1
                return None
            return offline
        if outcome.paused:
            return self._paused_refusal(agent)
        # Nothing left is a breach here: the next call, of any cost, would not fit.
        spent = [
            c for c in checks(adm, outcome) if c.money and c.used + c.reserved >= c.limit_value
        ]
        if plan.rates:
            await self.rates.prepare(plan, agent, now)
            spent += [c for c in self.rates.checks(plan, self.store, agent, intent, now)
                      if c.breached]  # fmt: skip
        return await self._conclude(adm, decide_breached(spent, outcome), now)

    # -- pause and resume -------------------------------------------------------------

    async def pause(self, agent: str, reason: str | None, now: float) -> None:
        await self.store.set_paused(agent, True, reason, now)
        self.bus.emit(events.Event(events.PAUSED, f"agent '{agent}' paused: {reason}", now, agent))

    async def resume(self, agent: str, now: float) -> bool:
        was = agent in self.store.paused
        await self.store.set_paused(agent, False, None, now)
        if was:
            self.bus.emit(events.Event(events.RESUMED, f"agent '{agent}' resumed", now, agent))
        return was

    def spent(self, agent: str, window: str, now: float) -> int:
        key = CounterKey(agent_scope(agent), f"cost:{window}", *self.calendar.window(window, now))
        return self.store.value(key)[0]


def plan_user(plan: Plan) -> str | None:
    for app in plan.applicable:
        if app.scope == "user":
            return app.subject
    return None


def check_data(check: Check) -> dict[str, Any]:
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
