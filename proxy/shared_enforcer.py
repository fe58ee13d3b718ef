"""Budgets shared by several replicas: the counters live in PostgreSQL.

The policies that apply to a call become, per counter, what admitting it adds and the cap
its block and pause limits allow (`_changes`); the database checks every cap and reserves
on all counters or on none, atomically across replicas (`meterproxy_admit`). The same pure
decision as in one process then runs here on the values the database saw, for the exact
refusal message, alert events and a breach's pause: both read the same numbers, so they
agree. The call's reservation is a lease named by its ledger id; the row, when it commits,
adds the cost to the counters and releases the lease (see `PostgresStorage.write_calls`):
a call's spend is counted exactly when its row is, and a row replayed from a spool is
counted once.

Only counters some limit reads are locked at admission: an agent under no limit costs one
read (is it paused?) and contends on nothing. A replica's leases are released by the
others when it stops heartbeating (it crashed), so a dead replica's reservations do not
hold budget for longer than `REPLICA_TTL`.

When the database cannot be reached, calls of agents under a block (or pause) limit get
503 `meter_unavailable` (fail closed, the default) or go through (`on_storage_error:
open`); their rows are spooled by the ledger writer and counted when replayed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import orjson

from proxy import events
from proxy.budgets import COST_WINDOWS, Calendar, PolicySet, validate_policy_json
from proxy.enforcer import BudgetState, Counter, Enforcer, IntentState, Refusal, Ticket
from proxy.money import usd_exact
from proxy.schema import FieldError
from proxy.storage import Storage
from proxy.storage.base import BudgetView, CounterKey, StorageUnavailable
from proxy.storage.postgres import CounterChange, PostgresStorage

log = logging.getLogger("meterproxy.budgets")
UNAVAILABLE_CODE = "meter_unavailable"
LIFETIME = (0.0, 1e18)  # the window of an intent's lifetime counter
REFRESH_SECONDS = 1.0  # API policies and the view of the counters, from the database
UPKEEP_SECONDS = 5.0
REPLICA_TTL = 30.0  # silent this long: a replica is dead and its leases are released
RETRY_SECONDS = 1.0  # after a failed connection, admissions skip the database this long


def _table(scope: Any, what: str) -> dict[str, Counter]:
    tables: dict[str, dict[str, Counter]] = {
        "cost": scope.cost, "requests": scope.requests, "intents": scope.intents,
    }  # fmt: skip
    return tables[what]


class SharedEnforcer(Enforcer):
    def __init__(
        self,
        calendar: Calendar,
        policies: PolicySet,
        bus: events.EventBus,
        storage: Storage,
        thresholds: tuple[float, ...] = (0.5, 0.8, 1.0),
        *,
        on_error: str = "closed",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(calendar, policies, bus, storage, thresholds)
        self.db = cast(PostgresStorage, storage)
        self.on_error = on_error
        self.clock = clock
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.db.replica = self.replica
        self.db.spend_keys = self.spend_keys
        self.database_down = False
        self._retry_at = 0.0  # monotonic: before it, do not try the database
        self._claims: set[asyncio.Future[None]] = set()

    # -- which counters ----------------------------------------------------------------

    def spend_keys(self, agent: str, intent: str | None, started: float) -> list[CounterKey]:
        """Every counter a call's cost goes to, limited or not (views show them all)."""
        cal = self.calendar
        keys = [
            CounterKey(name, f"cost:{window}", *cal.window(window, started))
            for name in (f"agent:{agent}", "global")
            for window in COST_WINDOWS
        ]
        if intent is not None:
            keys.append(_intent_key(intent))
        return keys

    # -- the state one admission sees --------------------------------------------------

    def _state_from(
        self, view: BudgetView, agent: str, intent: str | None, digest: bytes | None, now: float
    ) -> BudgetState:
        st = BudgetState()
        for key, (used, reserved) in view.counters.items():
            if key.scope.startswith("intent:"):
                if key not in view.new_keys and intent is not None:
                    st.intents[intent] = IntentState(agent, 0.0, used, reserved)
                continue
            scope = st.global_scope if key.scope == "global" else st.scope(agent)
            what, window = key.kind.split(":", 1)
            _table(scope, what)[window] = Counter(key.start, key.end, used, reserved, key)
        if view.paused:
            st.paused[agent] = view.paused_reason
        if digest is not None:
            # Hits inside the window, as far as the in-memory check is concerned.
            st.loops[(agent, intent or "", digest)] = deque([now] * view.loop_seen)
        return st

    def _emit(self, event: events.Event) -> None:
        capture = self._capture
        if capture is not None:
            capture.append(event)  # sent once the decision stands (see _admit_limited)
        else:
            self.bus.emit(event)

    _capture: list[events.Event] | None = None

    # -- admission -------------------------------------------------------------------

    async def admit(
        self,
        agent: str,
        intent: str | None,
        worst_case: int,
        now: float,
        digest: bytes | None = None,
        call_id: str | None = None,
    ) -> Ticket | Refusal:
        if time.monotonic() < self._retry_at:
            return self._offline(agent, intent, None)
        guard = self.loop_guard(agent)
        if guard is None:
            digest = None
        changes = self._changes(agent, intent, worst_case, now)
        # The lease is named by the call's ledger id: the row's commit releases it. A lease
        # under any other name would never be released while this replica lives.
        if call_id is None:
            raise ValueError("shared budgets need the call's ledger id (call_id)")
        lease = call_id
        try:
            if not changes and digest is None:
                result = await self._admit_unlimited(agent, intent, worst_case)
            else:
                result = await self._admit_limited(
                    changes, agent, intent, worst_case, now, digest, lease
                )
        except StorageUnavailable as e:
            return self._offline(agent, intent, e)
        self._back_online()
        if isinstance(result, Ticket):
            self.outstanding += 1
            self.outstanding_pico += worst_case
        return result

    async def _admit_unlimited(
        self, agent: str, intent: str | None, worst_case: int
    ) -> Ticket | Refusal:
        paused, reason = await self.db.agent_paused(agent)
        if paused:
            self.paused[agent] = reason
            return self._paused_refusal(self.state, agent)
        self.paused.pop(agent, None)
        return Ticket(agent, intent, worst_case)

    def _changes(
        self, agent: str, intent: str | None, worst_case: int, now: float
    ) -> list[CounterChange]:
        """What admitting this call adds to each counter a limit reads, and the caps the
        block and pause limits put on them (the tightest, when several apply)."""
        cal = self.calendar
        adds: dict[CounterKey, tuple[int, int, bool]] = {}
        caps: dict[CounterKey, int | None] = {}

        def want(key: CounterKey, used: int, reserved: int, new_only: bool = False) -> None:
            adds[key] = (used, reserved, new_only)
            caps.setdefault(key, None)

        def cap(key: CounterKey, value: int, action: str) -> None:
            if action in ("block", "pause"):
                old = caps.get(key)
                caps[key] = value if old is None else min(old, value)

        for scope, _, policy in self._policies(agent):
            name = f"agent:{agent}" if scope == "agent" else "global"
            for window, limit in policy.cost.items():
                key = CounterKey(name, f"cost:{window}", *cal.window(window, now))
                want(key, 0, worst_case)
                cap(key, limit - worst_case, policy.action)
            if policy.requests_per_minute is not None:
                key = CounterKey(name, "requests:minute", *cal.window("minute", now))
                want(key, 1, 0)
                cap(key, policy.requests_per_minute - 1, policy.action)
            if intent is None:
                continue
            for window, limit in policy.intents.items():
                key = CounterKey(name, f"intents:{window}", *cal.window(window, now))
                want(key, 1, 0, new_only=True)
                cap(key, limit - 1, policy.action)
            if policy.intents or policy.cost_per_intent is not None:
                key = _intent_key(intent)
                want(key, 0, worst_case)
                if policy.cost_per_intent is not None:
                    cap(key, policy.cost_per_intent - worst_case, policy.action)
        return [CounterChange(k, *adds[k][:2], caps[k], adds[k][2]) for k in adds]

    async def _admit_limited(
        self,
        changes: list[CounterChange],
        agent: str,
        intent: str | None,
        worst_case: int,
        now: float,
        digest: bytes | None,
        lease: str,
    ) -> Ticket | Refusal:
        """The database checks and reserves in one statement; the same decision then runs
        here on the counters as they were before it, for the refusal's message, alert
        events and a breach's pause. Both read the same values, so they agree."""
        loop = None
        policy = self._loop_policy(agent)
        if digest is not None and policy is not None and policy.loop_guard is not None:
            guard = policy.loop_guard
            blocking = policy.action in ("block", "pause")
            loop = (intent or "", digest.hex(), now - guard.window_seconds,
                    guard.max_identical_requests if blocking else None)  # fmt: skip
        outcome = await self.db.admit_counters(
            agent, changes, intent, (lease, worst_case) if worst_case else None, loop, now
        )
        before: dict[CounterKey, list[int]] = {}
        for change in changes:
            used, reserved = outcome.counters[change.key]
            if outcome.ok and (outcome.new_intent or not change.new_only):
                used, reserved = used - change.add_used, reserved - change.add_reserved
            before[change.key] = [used, reserved]
        fresh = {_intent_key(intent)} if intent is not None and outcome.new_intent else set()
        view = BudgetView(before, outcome.paused, outcome.paused_reason, fresh, outcome.loop_seen)
        captured: list[events.Event] = []
        self._capture = captured
        try:
            st = self._state_from(view, agent, intent, digest, now)
            result = self._admit_now(st, agent, intent, worst_case, now, digest)
        finally:
            self._capture = None
        if isinstance(result, Ticket) != outcome.ok:
            log.error(
                "shared budgets: the database %s a call of agent '%s' that the same limits"
                " here would have %s; the database's answer stands",
                "admitted" if outcome.ok else "refused", agent,
                "refused" if outcome.ok else "admitted",
            )  # fmt: skip
            if outcome.ok:
                result = Ticket(agent, intent, worst_case)
            else:
                result = self._paused_refusal(st, agent) if outcome.paused else Refusal(
                    "budget_exceeded", f"agent '{agent}' has reached a limit", None, None
                )  # fmt: skip
        if isinstance(result, Ticket) and worst_case:
            result.lease = lease
        await self._persist_breach_pause(st, view, agent, now)
        for event in captured:
            self.bus.emit(event)
        self._mirror(view, agent, intent, now)
        return result

    async def _persist_breach_pause(
        self, st: BudgetState, view: BudgetView, agent: str, now: float
    ) -> None:
        """A `pause` limit breached in the decision on `st`: the pause goes to the database."""
        if agent in st.paused and not view.paused:
            self.paused[agent] = st.paused[agent]
            await self.persist_pause(agent, now)

    def _mirror(self, view: BudgetView, agent: str, intent: str | None, now: float) -> None:
        """What an admission saw, into the local view (status, thresholds) at once."""
        if intent is not None:
            counter = view.counters.get(_intent_key(intent))
            if counter is not None:
                state = self.intents.get(intent)
                if state is None:
                    self.state.remember(intent, IntentState(agent, now, counter[0]))
                else:
                    state.used = counter[0]

    def _blocking(self, agent: str) -> bool:
        return any(p.action in ("block", "pause") for _, _, p in self._policies(agent))

    def _offline(self, agent: str, intent: str | None, error: Exception | None) -> Ticket | Refusal:
        if error is not None:
            if not self.database_down:
                log.error(
                    "budget database unreachable (%s): calls of agents under a block limit"
                    " are %s until it is back", error,
                    "refused (503)" if self.on_error == "closed" else "let through",
                )  # fmt: skip
            self.database_down = True
            self._retry_at = time.monotonic() + RETRY_SECONDS
        if self.on_error == "closed" and self._blocking(agent):
            return Refusal(
                UNAVAILABLE_CODE,
                "meterproxy: the budget database cannot be reached and agent"
                f" '{agent}' has a block budget: its calls are refused until the database is"
                " back (storage.on_storage_error: closed)",
                retry_after=int(RETRY_SECONDS) + 1,
                status=503,
            )
        self.outstanding += 1
        return Ticket(agent, intent, 0)  # nothing reserved; the row counts when replayed

    def _back_online(self) -> None:
        if self.database_down:
            log.warning("budget database reachable again")
            self.database_down = False

    # -- settlement: the ledger row does it in the database; here, the local view --------

    def settle(self, ticket: Ticket, actual: int | None, now: float) -> None:
        if ticket.settled:
            return
        ticket.settled = True
        cost = actual or 0
        self.outstanding -= 1
        self.outstanding_pico -= ticket.amount
        if cost > ticket.amount and ticket.amount:
            log.warning(
                "call of agent '%s' cost %s USD, more than its reservation of %s USD",
                ticket.agent, usd_exact(cost), usd_exact(ticket.amount),
            )  # fmt: skip
        if cost:
            self._count_locally(ticket.agent, ticket.intent, cost, now)

    async def add_reported(self, agent: str, intent: str | None, cost: int, now: float) -> None:
        """Counted in the database by the heartbeat's ledger row; here, the local view."""
        if cost:
            self._count_locally(agent, intent, cost, now)

    def _count_locally(self, agent: str, intent: str | None, cost: int, now: float) -> None:
        for s in (self.scope(agent), self.global_scope):
            for window in COST_WINDOWS:
                s.cost_counter(window, self.calendar, now).used += cost
        if intent is not None and intent in self.intents:
            self.intents[intent].used += cost
        self._crossings(agent, intent, now)

    async def standing(self, agent: str, intent: str | None, now: float) -> Refusal | None:
        keys = [change.key for change in self._changes(agent, intent, 0, now)]
        try:
            view = await self.db.budget_view(keys, agent)
        except StorageUnavailable as e:
            offline = self._offline(agent, intent, e)
            if isinstance(offline, Ticket):
                self.outstanding -= 1
                return None
            return offline
        st = self._state_from(view, agent, intent, None, now)
        result = self._standing(st, agent, intent, now)
        await self._persist_breach_pause(st, view, agent, now)
        self._mirror(view, agent, intent, now)
        return result

    # -- pauses go to the database at once (every admission reads them) ----------------

    async def persist_pause(self, agent: str, now: float) -> None:
        await self.db.set_paused(agent, True, self.paused.get(agent), now)

    # -- the local view, for status, metrics and thresholds; upkeep ---------------------

    async def load(self, storage: Storage, now: float) -> None:
        await self.refresh(now)

    async def refresh(self, now: float) -> None:
        """The counters of current windows, pauses and API policies, from the database."""
        rows = await self.db.budget_counters(now)
        fresh = BudgetState()
        for key, used, reserved in rows:
            if key.scope == "global":
                scope = fresh.global_scope
            elif key.scope.startswith("agent:"):
                scope = fresh.scope(key.scope[len("agent:") :])
            else:
                continue
            what, window = key.kind.split(":", 1)
            _table(scope, what)[window] = Counter(key.start, key.end, used, reserved, key)
        fresh.intents = self.state.intents
        fresh.paused = await self.db.paused_agents()
        self.state = fresh
        api = {}
        for agent, text in (await self.db.policies()).items():
            try:
                api[agent] = validate_policy_json(orjson.loads(text))
            except (FieldError, orjson.JSONDecodeError) as e:
                log.error("policy of agent '%s' in the database is invalid: %s", agent, e)
        if api != dict(self.policies.api):
            self.policies = self.policies.with_api(api)

    async def refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self.refresh(self.clock())
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("refreshing shared budgets failed")

    async def upkeep_loop(self) -> None:
        """Heartbeat this replica, release dead replicas' leases, prune old counters."""
        last_ok = -1e18
        while True:
            now = self.clock()
            # Only a replica that was itself in touch all along may call others dead: after
            # an outage every replica looks silent, and live calls hold those leases.
            trusted = now - last_ok < 2 * UPKEEP_SECONDS
            try:
                released = await self.db.upkeep(now, REPLICA_TTL if trusted else None)
                last_ok = now
                if released:
                    log.warning("released %d reservations of replicas that stopped", released)
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("shared budget upkeep failed")
            await asyncio.sleep(UPKEEP_SECONDS)

    def _fire_threshold(self, key: tuple[Any, ...], event: events.Event) -> None:
        """Once across replicas: the replica that claims the key in the database sends it."""
        claim_key = "|".join(str(part) for part in key)

        async def claim() -> None:
            try:
                if await self.db.claim_alert(claim_key, event.at):
                    self.bus.emit(event)
            except StorageUnavailable:
                self.bus.emit(event)  # better twice than never

        task = asyncio.ensure_future(claim())
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)


def _intent_key(intent: str) -> CounterKey:
    return CounterKey(f"intent:{intent}", "cost:life", *LIFETIME)
