"""Budget counters shared by several replicas, in PostgreSQL.

An admission's demands go to the database in one statement (`meterproxy_admit`), which
checks every cap and reserves on all counters or on none, atomically across replicas;
admissions that arrive together in one process share a round trip. The call's
reservation is a lease named by its ledger id; the row, when it commits, adds the cost
to the counters and releases the lease (`meterproxy_record`, fed the row's counters by
`spend_keys`): a call's spend is counted exactly when its row is, and a row replayed from
a spool is counted once.

Only counters some limit reads are locked: an agent under no limit costs one read (is it
paused?) and contends on nothing. A replica's leases are released by the others when it
stops heartbeating (it crashed), so a dead replica's reservations do not hold budget for
longer than `REPLICA_TTL`. The local view (status pages, thresholds, metrics) is the
database's counters, read every `REFRESH_SECONDS`, plus what this process did since.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from proxy.admission import Admission, Outcome, Plan, spend_keys
from proxy.counters import Ticket, agents_in
from proxy.records import CallRecord
from proxy.storage.base import CounterKey
from proxy.storage.postgres import AdmitResult, CounterChange, PostgresStorage
from proxy.windows import Calendar

REFRESH_SECONDS = 1.0  # API policies and the view of the counters, from the database
UPKEEP_SECONDS = 5.0
REPLICA_TTL = 30.0  # silent this long: a replica is dead and its leases are released


class PgCounters:
    shared = True

    def __init__(self, db: PostgresStorage, calendar: Calendar) -> None:
        self.db = db
        self.calendar = calendar
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        self.values: dict[CounterKey, list[int]] = {}
        self._paused: dict[str, str | None] = {}
        # What applies to an agent's calls (the enforcer sets it: it knows the policies):
        # an end user's counters, an intent's minute counters, count there while it does.
        self.plan_for: Callable[[str, str | None], Plan] | None = None

    @property
    def paused(self) -> dict[str, str | None]:
        return self._paused

    def spend_keys(self, record: CallRecord) -> Sequence[CounterKey]:
        """The counters a committed row's cost goes to (the ledger writer passes them to
        `meterproxy_record`)."""
        plan = self.plan_for(record.agent, record.end_user) if self.plan_for else None
        if plan is None:
            return spend_keys(record.agent, record.intent, self.calendar, record.started_at)
        return spend_keys(record.agent, record.intent, self.calendar, record.started_at,
                          plan.user_scope, plan.rate_per_intent)  # fmt: skip

    # -- admission -------------------------------------------------------------------

    async def prepare(self, adm: Admission) -> None:
        """Nothing to load: the database finds an old intent's spend itself."""

    def ticket_keys(self, adm: Admission) -> Sequence[CounterKey]:
        return [d.key for d in adm.demands if d.add_reserved]  # the lease's counters

    async def admit(self, adm: Admission, lease: str) -> Outcome:
        if not adm.demands and adm.loop is None:
            paused, reason = await self.db.agent_paused(adm.agent)
            self._set_paused_view(adm.agent, paused, reason)
            return Outcome(not paused, False, paused, reason)
        loop = None
        if adm.loop is not None:
            loop = (adm.loop.intent, adm.loop.digest.hex(), adm.loop.since, adm.loop.max)
        result = await self.db.admit_counters(
            self.replica, adm.agent, _changes(adm), adm.intent,
            (lease, adm.amount) if adm.amount else None, loop, adm.now,
        )  # fmt: skip
        return self._outcome(adm, result)

    async def extend(self, ticket: Ticket, adm: Admission) -> Outcome:
        if ticket.lease is None:  # nothing limited holds it: nothing to check
            ticket.amount += adm.amount
            return Outcome(True)
        result = await self.db.admit_counters(
            self.replica, adm.agent, _changes(adm), None, (ticket.lease, adm.amount), None,
            adm.now,
        )  # fmt: skip
        outcome = self._outcome(adm, result)
        if outcome.ok:
            if ticket.settled:  # the call ended meanwhile: its row has released the rest
                await self.db.release_lease(ticket.lease)
                return Outcome(False)
            ticket.amount += adm.amount
        return outcome

    def _outcome(self, adm: Admission, result: AdmitResult) -> Outcome:
        before: dict[CounterKey, tuple[int, int]] = {}
        for d in adm.demands:
            used, reserved = result.counters.get(d.key, (0, 0))
            applied = result.ok and (result.new_intent or not d.new_only)
            self.values[d.key] = [used, reserved]  # what this admission saw, into the view
            if applied:
                used, reserved = used - d.add_used, reserved - d.add_reserved
            before[d.key] = (used, reserved)
        self._set_paused_view(adm.agent, result.paused, result.paused_reason)
        return Outcome(result.ok, result.new_intent, result.paused, result.paused_reason,
                       result.loop_seen, before)  # fmt: skip

    def _set_paused_view(self, agent: str, paused: bool, reason: str | None) -> None:
        if paused:
            self._paused[agent] = reason
        else:
            self._paused.pop(agent, None)

    async def transfer(self, ticket: Ticket, lease: str) -> None:
        """The same amount on the same counters under a new lease, before the old one's row
        commits and releases it: reserved for a moment twice, never not at all."""
        if ticket.lease is None or not ticket.amount:
            return
        changes = [CounterChange(k, 0, ticket.amount, None) for k in ticket.keys]
        await self.db.admit_counters(self.replica, ticket.agent, changes, None,
                                     (lease, ticket.amount), None, time.time())  # fmt: skip
        ticket.lease = lease

    async def release(self, ticket: Ticket) -> None:
        if ticket.lease is not None:
            await self.db.release_lease(ticket.lease)
        self._view_settle(ticket, 0)

    def settle(self, ticket: Ticket, cost: int) -> None:
        self._view_settle(ticket, cost)

    def _view_settle(self, ticket: Ticket, cost: int) -> None:
        for key in ticket.keys:
            v = self.values.get(key)
            if v is not None:
                v[1] -= ticket.amount
        self.add_spend(ticket.spend, cost)

    def add_spend(self, keys: Iterable[CounterKey], cost: int) -> None:
        if not cost:
            return
        for key in keys:
            v = self.values.get(key)
            if v is None:
                v = self.values[key] = [0, 0]
            v[0] += cost

    async def read(self, adm: Admission) -> Outcome:
        view = await self.db.budget_view([d.key for d in adm.demands], adm.agent)
        before = {}
        for d in adm.demands:
            used, reserved = view.counters.get(d.key, [0, 0])
            self.values[d.key] = [used, reserved]
            before[d.key] = (used, reserved)
        self._set_paused_view(adm.agent, view.paused, view.paused_reason)
        return Outcome(not view.paused, False, view.paused, view.paused_reason, 0, before)

    def holds(self, key: CounterKey) -> bool:
        return key in self.values

    def value(self, key: CounterKey) -> tuple[int, int]:
        v = self.values.get(key)
        return (v[0], v[1]) if v is not None else (0, 0)

    async def set_paused(self, agent: str, paused: bool, reason: str | None, now: float) -> None:
        await self.db.set_paused(agent, paused, reason, now)
        self._set_paused_view(agent, paused, reason)

    def known_agents(self) -> set[str]:
        return agents_in(self.values)

    # -- the local view and upkeep -------------------------------------------------------

    async def refresh(self, now: float) -> None:
        """The counters of current windows and the pauses, from the database. Lifetime
        counters (intents) stay as the last admission saw them."""
        fresh = {
            key: [used, reserved] for key, used, reserved in await self.db.budget_counters(now)
        }
        for key, value in self.values.items():
            if key.kind == "cost:life":
                fresh.setdefault(key, value)
        self.values = fresh
        self._paused = await self.db.paused_agents()

    async def upkeep(self, now: float, trusted: bool) -> int:
        return await self.db.upkeep(self.replica, now, REPLICA_TTL if trusted else None)

    async def claim_alert(self, key: str, at: float) -> bool:
        return await self.db.claim_alert(key, at)


def _changes(adm: Admission) -> list[CounterChange]:
    return [
        CounterChange(d.key, d.add_used, d.add_reserved, d.cap, d.new_only) for d in adm.demands
    ]
