"""Budget counters behind one interface: in memory for one process (`MemoryCounters`), or
in PostgreSQL for replicas (`proxy.pg_counters.PgCounters`).

A store applies an admission's demands all or nothing (`admit`), extends a reservation
(`extend`), and keeps a local view of the counters for status pages and thresholds. Both
stores answer with an `Outcome` that the same pure `proxy.admission.decide` reads.

In memory, check and reserve run without an `await` between them, so on one event loop
they are one atomic step. Spend is rebuilt from the ledger at startup; reservations live
only in memory, so a crash can never leave one behind.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.admission import GLOBAL, MINUTE_KIND, Admission, Outcome, agent_scope, split_scope
from proxy.policy import COST_WINDOWS, INTENT_WINDOWS
from proxy.storage import Storage
from proxy.storage.base import MINUTE_COUNTERS_KEEP_SECONDS, CounterKey
from proxy.windows import Calendar

_MAX_LIFETIME_COUNTERS = 200_000  # intents kept in memory; older idle ones reload lazily
_MAX_LOOP_KEYS = 100_000
_PRUNE_EVERY = 10_000  # admissions between two sweeps of ended windows


@dataclass(slots=True)
class Ticket:
    """An admitted call's reservation; settled exactly once."""

    agent: str
    intent: str | None
    amount: int  # pico-USD reserved, extensions included
    keys: Sequence[CounterKey] = ()  # counters holding the reservation
    spend: Sequence[CounterKey] = ()  # counters its cost goes to
    lease: str | None = None  # shared budgets: the reservation's id in the database
    settled: bool = False
    user: str | None = None  # the end user whose limits it was admitted under
    shadow: str | None = None  # a dry-run limit that would have refused it


class CounterStore(Protocol):
    shared: bool

    async def prepare(self, adm: Admission) -> None:
        """Load what the admission reads and is not in the view yet (an old intent)."""

    def ticket_keys(self, adm: Admission) -> Sequence[CounterKey]:
        """The counters an admitted call's reservation is held on."""

    async def admit(self, adm: Admission, lease: str) -> Outcome: ...

    async def extend(self, ticket: Ticket, adm: Admission) -> Outcome: ...

    async def release(self, ticket: Ticket) -> None:
        """Give back a reservation nothing was spent on (a call refused after admission)."""

    async def transfer(self, ticket: Ticket, lease: str) -> None:
        """Keep a reservation under another name, past its own row's commit."""

    def settle(self, ticket: Ticket, cost: int) -> None:
        """The call's cost in place of its reservation, in the local view. (Shared: the
        ledger row does it in the database.)"""

    def add_spend(self, keys: Iterable[CounterKey], cost: int) -> None:
        """Spend without a reservation (a heartbeat's report), in the local view."""

    async def read(self, adm: Admission) -> Outcome:
        """The counters an admission would read, changing nothing."""

    def holds(self, key: CounterKey) -> bool:
        """Whether the view has this counter."""

    def value(self, key: CounterKey) -> tuple[int, int]:
        """(used, reserved) as this process last saw it."""

    async def set_paused(
        self, agent: str, paused: bool, reason: str | None, now: float
    ) -> None: ...

    def known_agents(self) -> set[str]:
        """Agents with a counter in the view."""

    @property
    def paused(self) -> dict[str, str | None]: ...


class MemoryCounters:
    """Counters of one process: a dict of (used, reserved) per counter key."""

    shared = False

    def __init__(self, storage: Storage | None = None) -> None:
        self.storage = storage
        self.values: dict[CounterKey, list[int]] = {}
        self.lifetimes: OrderedDict[CounterKey, None] = OrderedDict()  # intents, oldest first
        self._paused: dict[str, str | None] = {}
        self.loops: dict[tuple[str, str, bytes], deque[float]] = {}
        self._admissions = 0

    @property
    def paused(self) -> dict[str, str | None]:
        return self._paused

    # -- rebuilding from the ledger ------------------------------------------------------

    async def load(self, storage: Storage, calendar: Calendar, now: float) -> None:
        """Spend per window, requests this minute, intents started and pauses, from the
        ledger (reservations are never stored: a crash leaves none behind)."""
        for window in COST_WINDOWS:
            start, end = calendar.window(window, now)
            by_agent = await storage.cost_by_agent_since(int(start))
            for agent, cost in by_agent.items():
                self.values[CounterKey(agent_scope(agent), f"cost:{window}", start, end)] = [
                    cost, 0
                ]  # fmt: skip
            self.values[CounterKey(GLOBAL, f"cost:{window}", start, end)] = [
                sum(by_agent.values()), 0
            ]  # fmt: skip
        for window in INTENT_WINDOWS:
            start, end = calendar.window(window, now)
            started = await storage.intents_started_since(start)
            for agent, n in started.items():
                self.values[CounterKey(agent_scope(agent), f"intents:{window}", start, end)] = [
                    n, 0
                ]  # fmt: skip
            self.values[CounterKey(GLOBAL, f"intents:{window}", start, end)] = [
                sum(started.values()), 0
            ]  # fmt: skip
        start, end = calendar.window("minute", now)
        requests = await storage.requests_by_agent_since(start)
        for agent, n in requests.items():
            self.values[CounterKey(agent_scope(agent), "requests:minute", start, end)] = [n, 0]
        self.values[CounterKey(GLOBAL, "requests:minute", start, end)] = [
            sum(requests.values()), 0
        ]  # fmt: skip
        for agent, start, cost in await storage.cost_by_minute_since(now - 3600):
            for scope in (agent_scope(agent), GLOBAL):
                value = self.values.setdefault(CounterKey(scope, MINUTE_KIND, start, start + 60),
                                               [0, 0])  # fmt: skip
                value[0] += cost
        self._paused = await storage.paused_agents()

    async def prepare(self, adm: Admission) -> None:
        if self.storage is None:
            return
        for d in adm.demands:  # an end user's counters are made on demand: from the ledger
            ukey = d.key
            if ukey.scope.startswith("user:") and ukey not in self.values:
                _, agent, user = split_scope(ukey.scope)
                assert user is not None
                cost = await self.storage.user_cost_since(agent, user, ukey.start, ukey.end)
                self.values.setdefault(ukey, [cost, 0])
        key = adm.intent_key
        if key is None or key in self.values or adm.intent is None:
            return
        row = await self.storage.intent(adm.agent, adm.intent)
        if row is not None and key not in self.values:
            self._remember(key, [row.cost_pico, 0])

    def ticket_keys(self, adm: Admission) -> Sequence[CounterKey]:
        return adm.reserving  # every window, limited or not: views show them all

    def _remember(self, key: CounterKey, value: list[int]) -> None:
        self.values[key] = value
        self.lifetimes[key] = None
        if len(self.lifetimes) > _MAX_LIFETIME_COUNTERS:
            for old in list(self.lifetimes)[: _MAX_LIFETIME_COUNTERS // 10]:
                if self.values.get(old, (0, 0))[1] == 0:  # its rows are long committed
                    del self.lifetimes[old]
                    self.values.pop(old, None)

    # -- admission ---------------------------------------------------------------------

    async def admit(self, adm: Admission, lease: str) -> Outcome:
        return self.admit_now(adm)

    def admit_now(self, adm: Admission) -> Outcome:
        """Check every cap, then apply every demand, or none: no await in here."""
        values = self.values
        before = {d.key: _pair(values.get(d.key)) for d in adm.demands}
        ikey = adm.intent_key
        fresh = ikey is not None and ikey not in values
        paused = adm.agent in self._paused
        ok = not paused
        seen = 0
        if adm.loop is not None:
            seen = self._loop_hit(adm)
            if adm.loop.max is not None and seen >= adm.loop.max:
                ok = False
        if ok:
            for d in adm.demands:
                if d.cap is not None and (fresh or not d.new_only):
                    used, reserved = before[d.key]
                    if used + reserved > d.cap:
                        ok = False
                        break
        if ok:
            for d in adm.demands:
                if d.new_only and not fresh:
                    continue
                v = values.get(d.key)
                if v is None:
                    v = values[d.key] = [0, 0]
                v[0] += d.add_used
                v[1] += d.add_reserved
            limited = {d.key for d in adm.demands}
            for key in adm.spend_keys:
                if key in limited:
                    continue
                v = values.get(key)
                if v is None:
                    v = values[key] = [0, 0]
                v[1] += adm.amount
            if ikey is not None:
                if fresh:
                    self._remember(ikey, values[ikey])
                else:
                    self.lifetimes.move_to_end(ikey, last=True)
            self._admissions += 1
            if self._admissions % _PRUNE_EVERY == 0:
                self.prune(adm.now)
        return Outcome(ok, fresh, paused, self._paused.get(adm.agent), seen, before)

    def _loop_hit(self, adm: Admission) -> int:
        loop = adm.loop
        assert loop is not None
        key = (adm.agent, loop.intent, loop.digest)
        hits = self.loops.get(key)
        if hits is None:
            if len(self.loops) >= _MAX_LOOP_KEYS:
                self._prune_loops(adm.now)
            hits = self.loops[key] = deque()
        while hits and hits[0] <= loop.since:
            hits.popleft()
        seen = len(hits)
        hits.append(adm.now)  # refused attempts count too: a loop stays stopped while it runs
        return seen

    def _prune_loops(self, now: float) -> None:
        horizon = now - 3600.0
        for key in [k for k, hits in self.loops.items() if not hits or hits[-1] < horizon]:
            del self.loops[key]
        if len(self.loops) >= _MAX_LOOP_KEYS:  # all recent: drop the oldest tenth
            for key in list(self.loops)[: _MAX_LOOP_KEYS // 10]:
                del self.loops[key]

    def prune(self, now: float) -> None:
        """Drop counters of windows that ended a day ago (minute counters: two hours ago)
        and hold no reservation."""
        horizon, minutes = now - 86400, now - MINUTE_COUNTERS_KEEP_SECONDS
        for key in [
            k for k, v in self.values.items()
            if v[1] == 0 and (k.end < horizon or (k.kind == MINUTE_KIND and k.end < minutes))
        ]:  # fmt: skip
            del self.values[key]

    async def extend(self, ticket: Ticket, adm: Admission) -> Outcome:
        """More reservation for an admitted call (a stream that runs on): the caps of its
        cost limits only; the extra amount goes on every counter of the first one."""
        if ticket.settled:
            return Outcome(False)
        before = {d.key: _pair(self.values.get(d.key)) for d in adm.demands}
        for d in adm.demands:
            used, reserved = before[d.key]
            if d.cap is not None and used + reserved > d.cap:
                return Outcome(False, before=before)
        for key in ticket.keys:
            v = self.values.get(key)
            if v is None:
                v = self.values[key] = [0, 0]
            v[1] += adm.amount
        ticket.amount += adm.amount
        return Outcome(True, before=before)

    async def release(self, ticket: Ticket) -> None:
        self.settle(ticket, 0)

    async def transfer(self, ticket: Ticket, lease: str) -> None:
        """Nothing to do in memory: no row releases a reservation here."""

    def settle(self, ticket: Ticket, cost: int) -> None:
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
                if key.kind == "cost:life":
                    self._remember(key, [cost, 0])
                    continue
                v = self.values[key] = [0, 0]
            v[0] += cost

    async def read(self, adm: Admission) -> Outcome:
        await self.prepare(adm)
        before = {d.key: _pair(self.values.get(d.key)) for d in adm.demands}
        paused = adm.agent in self._paused
        return Outcome(not paused, False, paused, self._paused.get(adm.agent), 0, before)

    def holds(self, key: CounterKey) -> bool:
        return key in self.values

    def value(self, key: CounterKey) -> tuple[int, int]:
        return _pair(self.values.get(key))

    async def set_paused(self, agent: str, paused: bool, reason: str | None, now: float) -> None:
        if paused:
            self._paused[agent] = reason
        else:
            self._paused.pop(agent, None)
        if self.storage is not None:
            await self.storage.set_paused(agent, paused, reason, now)

    def known_agents(self) -> set[str]:
        return agents_in(self.values)


def agents_in(values: Iterable[CounterKey]) -> set[str]:
    names = set()
    for key in values:
        kind, agent, _ = split_scope(key.scope)
        if kind == "agent":
            names.add(agent)
    return names


def _pair(value: list[int] | None) -> tuple[int, int]:
    return (value[0], value[1]) if value is not None else (0, 0)
