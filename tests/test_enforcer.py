"""Admission and settlement with an explicit clock: on in-memory counters (one process) and
on counters shared in PostgreSQL (replicas), the same decisions from the same tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy import budget_sync, events
from proxy.admission import intent_key
from proxy.budget_views import status
from proxy.counters import Ticket
from proxy.enforcer import Enforcer, Refusal
from proxy.pg_counters import PgCounters
from proxy.policy import PolicySet, parse_policy
from proxy.records import CallRecord
from proxy.schema import Section
from proxy.storage import Storage, open_storage
from proxy.storage.postgres import PostgresStorage
from proxy.windows import Calendar
from tests.records import call_record

USD = 10**12
TZ = "Europe/Berlin"
NOON = datetime(2026, 11, 25, 12, 0, tzinfo=ZoneInfo(TZ)).timestamp()
Make = Callable[..., Awaitable[tuple[Enforcer, list[events.Event]]]]
_ids = itertools.count()
_calls: dict[int, tuple[Ticket, str, float]] = {}  # id(ticket) -> (ticket, call id, started)


def policy(**limits: Any) -> Any:
    return parse_policy(Section(limits))


@pytest.fixture(params=["memory", "postgresql"])
async def make(request: Any) -> AsyncIterator[Make]:
    storages: list[Storage] = []

    async def factory(agents: dict[str, Any] | None = None, defaults: Any = None,
                      global_: Any = None, thresholds: tuple[float, ...] = (0.5, 0.8, 1.0),
                      ) -> tuple[Enforcer, list[events.Event]]:  # fmt: skip
        bus = events.EventBus()
        seen: list[events.Event] = []
        bus.subscribe(seen.append)
        policies = PolicySet(global_policy=global_, defaults=defaults, agents=agents or {})
        if request.param == "memory":
            return Enforcer(Calendar(TZ), policies, bus, None, thresholds), seen
        # A database of its own per enforcer, as a fresh process would have.
        storage = await open_storage(request.getfixturevalue("postgres").create_database())
        assert isinstance(storage, PostgresStorage)
        storages.append(storage)
        store = PgCounters(storage, Calendar(TZ))
        return Enforcer(Calendar(TZ), policies, bus, store, thresholds), seen

    yield factory
    for storage in storages:
        await storage.close()


async def admit(e: Enforcer, agent: str = "a", cost: int = 0, now: float = NOON,
                intent: str | None = None, digest: bytes | None = None) -> Ticket | Refusal:  # fmt: skip
    call_id = f"req_{next(_ids)}"
    result = await e.admit(agent, intent, cost, now, digest, call_id=call_id)
    if isinstance(result, Ticket):
        _calls[id(result)] = (result, call_id, now)
    return result


def row(call_id: str, agent: str, intent: str | None, at: float, cost: int,
        source: str = "provider") -> CallRecord:  # fmt: skip
    return call_record(call_id, at, agent=agent, intent=intent, cost_pico=cost,
                       usage_source=source)  # fmt: skip


async def settle(e: Enforcer, t: Ticket | Refusal, cost: int, now: float = NOON) -> None:
    """What the proxy does when a call ends: settle, and commit its ledger row (which, with
    shared budgets, is what counts the spend and releases the reservation)."""
    assert isinstance(t, Ticket)
    e.settle(t, cost, now)
    if isinstance(e.store, PgCounters):
        _, call_id, started = _calls[id(t)]
        await e.store.db.write_calls([row(call_id, t.agent, t.intent, started, cost)],
                                     e.store.spend_keys)  # fmt: skip
        await budget_sync.refresh(e, e.store, now)
        await drain(e)


async def report(e: Enforcer, agent: str, intent: str | None, cost: int, now: float) -> None:
    """A heartbeat's spend: counted, and its row committed."""
    await e.add_reported(agent, intent, cost, now)
    if isinstance(e.store, PgCounters):
        record = row(f"req_{next(_ids)}", agent, intent, now, cost, source="reported")
        await e.store.db.write_calls([record], e.store.spend_keys)
        await budget_sync.refresh(e, e.store, now)


async def drain(e: Enforcer) -> None:
    """Threshold alerts of shared budgets are claimed in the database first."""
    await asyncio.gather(*list(e.crossings.claims))


async def test_day_limit_reserve_settle_and_reset_at_local_midnight(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_cost_per_day_usd=1)})
    t1 = await admit(e, cost=USD * 6 // 10)
    assert isinstance(t1, Ticket)
    # 0.6 reserved: a 0.5 worst case does not fit (0.6 + 0.5 > 1) even though nothing is spent.
    r = await admit(e, cost=USD // 2)
    assert isinstance(r, Refusal) and r.code == "max_cost_per_day_usd"
    await settle(e, t1, USD // 10, NOON)  # it cost 0.1 in the end: 0.9 left
    assert isinstance(await admit(e, cost=USD // 2), Ticket)
    assert e.outstanding == 1
    midnight = datetime(2026, 11, 26, 0, 0, tzinfo=ZoneInfo(TZ)).timestamp()
    r = await admit(e, cost=USD // 2, now=midnight - 1)
    assert isinstance(r, Refusal) and r.retry_after == 1
    assert r.headers()["Retry-After"] == "1"
    assert r.headers()["x-meter-remaining-usd"] == "0.4"
    assert isinstance(await admit(e, cost=USD // 2, now=midnight), Ticket)


async def test_every_cost_window(make: Make) -> None:
    for key, window_s in (("max_cost_per_hour_usd", 3600), ("max_cost_per_week_usd", 86400 * 7),
                          ("max_cost_per_month_usd", 86400 * 31)):  # fmt: skip
        e, _ = await make(agents={"a": policy(**{key: 1})})
        t = await admit(e, cost=USD)
        assert isinstance(t, Ticket)
        await settle(e, t, USD, NOON)
        r = await admit(e, cost=1)
        assert isinstance(r, Refusal) and r.code == key
        assert r.retry_after is not None and 0 < r.retry_after <= window_s


async def test_defaults_apply_only_without_an_own_policy_and_global_to_all(make: Make) -> None:
    e, _ = await make(
        agents={"big": policy(max_cost_per_day_usd=10)},
        defaults=policy(max_cost_per_day_usd=1),
        global_=policy(max_cost_per_day_usd=3),
    )
    assert isinstance(await admit(e, "big", cost=2 * USD), Ticket)  # own policy, not defaults
    r = await admit(e, "small", cost=2 * USD)
    assert isinstance(r, Refusal) and r.check is not None and r.check.scope == "agent"
    assert isinstance(await admit(e, "small", cost=USD), Ticket)  # 3 of global 3 now reserved
    r = await admit(e, "big", cost=1)
    assert isinstance(r, Refusal) and r.check is not None and r.check.scope == "global"
    assert "all agents together" in r.message


async def test_intent_limits(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_cost_per_intent_usd=1, max_intents_per_hour=2)})
    t = await admit(e, intent="i1", cost=USD)
    assert isinstance(t, Ticket)
    await settle(e, t, USD, NOON)
    r = await admit(e, intent="i1", cost=1)
    assert isinstance(r, Refusal) and r.code == "max_cost_per_intent_usd"
    assert r.retry_after is None and "does not reset" in r.message
    assert isinstance(await admit(e, intent="i2"), Ticket)  # second intent this hour
    assert isinstance(await admit(e, intent="i2"), Ticket)  # not a new one
    r = await admit(e, intent="i3")
    assert isinstance(r, Refusal) and r.code == "max_intents_per_hour"
    assert isinstance(await admit(e, intent="i3", now=NOON + 3600), Ticket)  # next hour


async def test_requests_per_minute_and_intents_per_day(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_requests_per_minute=3, max_intents_per_day=1)})
    for _ in range(3):
        assert isinstance(await admit(e), Ticket)
    r = await admit(e)
    assert isinstance(r, Refusal) and r.code == "max_requests_per_minute"
    assert isinstance(await admit(e, now=NOON + 60, intent="x"), Ticket)
    r = await admit(e, now=NOON + 120, intent="y")
    assert isinstance(r, Refusal) and r.code == "max_intents_per_day"


async def test_alert_lets_the_call_through_and_emits_once_per_call(make: Make) -> None:
    e, seen = await make(agents={"a": policy(max_cost_per_day_usd=1, action_on_breach="alert")})
    assert isinstance(await admit(e, cost=2 * USD), Ticket)
    assert [ev.kind for ev in seen] == [events.ALERT]
    assert seen[0].agent == "a" and seen[0].data["limit"] == "max_cost_per_day_usd"


async def test_pause_pauses_until_resumed(make: Make) -> None:
    e, seen = await make(agents={"a": policy(max_cost_per_day_usd=1, action_on_breach="pause")})
    r = await admit(e, cost=2 * USD)
    assert isinstance(r, Refusal) and r.code == "max_cost_per_day_usd"
    assert "is now paused" in r.message and "Retry-After" not in r.headers()
    r = await admit(e, cost=0)
    assert isinstance(r, Refusal) and r.code == "agent_paused"
    assert events.PAUSED in [ev.kind for ev in seen]
    await e.resume("a", NOON)
    assert isinstance(await admit(e, cost=0), Ticket)


async def test_loop_guard_trips_on_the_n_plus_first_identical_request(make: Make) -> None:
    guard = {"max_identical_requests": 3, "window_seconds": 60}
    e, seen = await make(agents={"a": policy(loop_guard=guard)})
    for i in range(3):
        assert isinstance(await admit(e, intent="t", digest=b"same", now=NOON + i), Ticket)
    assert isinstance(await admit(e, intent="t", digest=b"other", now=NOON + 3), Ticket)
    r = await admit(e, intent="t", digest=b"same", now=NOON + 4)
    assert isinstance(r, Refusal) and r.code == "loop_detected"
    assert events.LOOP in [ev.kind for ev in seen]
    # Another intent is another task: not the same loop.
    assert isinstance(await admit(e, intent="u", digest=b"same", now=NOON + 5), Ticket)
    # Refused attempts count too; once the loop has been quiet for the window, it passes.
    assert isinstance(await admit(e, intent="t", digest=b"same", now=NOON + 30), Refusal)
    assert isinstance(await admit(e, intent="t", digest=b"same", now=NOON + 91), Ticket)


async def test_settle_is_idempotent_and_returns_reservations_to_zero(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_cost_per_day_usd=10)})
    tickets = [await admit(e, cost=USD, intent="i") for _ in range(5)]
    assert e.outstanding == 5 and e.outstanding_pico == 5 * USD
    for t in tickets:
        assert isinstance(t, Ticket)
        await settle(e, t, USD // 2, NOON)
        await settle(e, t, USD // 2, NOON)  # a second settle changes nothing
    assert (e.outstanding, e.outstanding_pico) == (0, 0)
    assert e.spent("a", "day", NOON) == 5 * USD // 2
    if isinstance(e.store, PgCounters):  # the lifetime counter lives in the database
        assert await e.store.db.fetch(
            "SELECT used, reserved FROM budget_counters WHERE scope = 'intent:a' || chr(31) || 'i'"
        ) == [(5 * USD // 2, 0)]  # fmt: skip
        assert await e.store.db.fetch("SELECT COUNT(*) FROM reservations") == [(0,)]
    else:
        assert e.store.value(intent_key("a", "i")) == (5 * USD // 2, 0)
    view = status(e, "a", NOON)
    assert view["windows"]["day"] == {
        "spent_usd": "2.5", "reserved_usd": "0",
        "starts": "2026-11-25T00:00:00+01:00", "resets": "2026-11-26T00:00:00+01:00",
    }  # fmt: skip
    assert view["limits"][0]["remaining_usd"] == "7.5"


async def test_thresholds_fire_once_per_window(make: Make) -> None:
    e, seen = await make(agents={"a": policy(max_cost_per_day_usd=1)})
    for _ in range(10):  # ten calls of $0.10: 50%, 80% and 100% each crossed once
        t = await admit(e, cost=0)
        assert isinstance(t, Ticket)
        await settle(e, t, USD // 10, NOON)
    assert isinstance(await admit(e, cost=1), Refusal)  # the budget is spent exactly
    fired = [ev.data["threshold"] for ev in seen if ev.kind == events.THRESHOLD]
    assert fired == [0.5, 0.8, 1.0]
    tomorrow = NOON + 86400
    for _ in range(6):
        t = await admit(e, cost=0, now=tomorrow)
        assert isinstance(t, Ticket)
        await settle(e, t, USD // 10, tomorrow)
    fired = [ev.data["threshold"] for ev in seen if ev.kind == events.THRESHOLD]
    assert fired == [0.5, 0.8, 1.0, 0.5]


async def test_heartbeat_spend_counts(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_cost_per_day_usd=1)})
    await report(e, "a", "i1", 6 * USD // 10, NOON)
    assert await e.standing("a", "i1", NOON) is None
    r = await admit(e, cost=USD // 2)
    assert isinstance(r, Refusal)
    await report(e, "a", "i1", 4 * USD // 10, NOON)
    standing = await e.standing("a", "i1", NOON)
    assert standing is not None and standing.code == "max_cost_per_day_usd"


async def test_concurrent_admissions_reserve_exactly_what_fits(make: Make) -> None:
    e, _ = await make(
        agents={"a": policy(max_cost_per_day_usd=1, max_cost_per_intent_usd=0.7)},
        global_=policy(max_cost_per_hour_usd=2),
    )
    results = await asyncio.gather(
        *(admit(e, cost=3 * USD // 10, intent=f"i{i % 2}") for i in range(100))
    )
    tickets = [r for r in results if isinstance(r, Ticket)]
    # 0.3 each: three fit in the day's 1.0, at most two in each intent's 0.7.
    assert len(tickets) == 3
    assert sorted(t.intent or "" for t in tickets) in (["i0", "i0", "i1"], ["i0", "i1", "i1"])
    codes = {r.code for r in results if isinstance(r, Refusal)}
    assert codes <= {"max_cost_per_day_usd", "max_cost_per_intent_usd"}
    assert e.outstanding == 3 and e.outstanding_pico == 9 * USD // 10
    for t in tickets:
        await settle(e, t, USD // 10)
    assert (e.outstanding, e.outstanding_pico) == (0, 0)
    assert status(e, "a", NOON)["windows"]["day"]["reserved_usd"] == "0"
    assert status(e, "a", NOON)["windows"]["day"]["spent_usd"] == "0.3"


async def test_concurrent_new_intents_count_once_each(make: Make) -> None:
    e, _ = await make(agents={"a": policy(max_intents_per_hour=2)})
    intents = ["x", "y", "z"] * 5
    results = await asyncio.gather(*(admit(e, intent=i) for i in intents))
    admitted = {i for i, r in zip(intents, results, strict=True) if isinstance(r, Ticket)}
    refused = {i for i, r in zip(intents, results, strict=True) if isinstance(r, Refusal)}
    # The first two intents to arrive are admitted with every call; the third with none.
    assert len(admitted) == 2 and refused == set(intents) - admitted
    assert sum(isinstance(r, Ticket) for r in results) == 10
    assert {r.code for r in results if isinstance(r, Refusal)} == {"max_intents_per_hour"}
