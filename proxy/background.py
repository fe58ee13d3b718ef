"""Background responses (`background: true`): billed when they finish, not when queued.

The create call answers `queued` with no usage. Its reservation is kept, and the call's
row says `usage_source=pending`. When the proxy sees the response finish (the client's own
`GET /v1/responses/{id}` or stream through the proxy, or the proxy's own retrieval with the
client's credentials, every few seconds) it writes one more row, `bg_<response id>`, with
the provider's usage and cost, and settles the reservation. The row's id is its key: seen
finished twice, it is written once. After a restart the credentials are gone (they live in
memory only); a retrieval through the proxy still records the cost then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from proxy.counters import Ticket
from proxy.pricing import ModelPrice
from proxy.records import CallRecord
from proxy.shapes.base import BodyFacts
from proxy.shapes.openai import facts_from_body
from proxy.upstream import client_timeout
from proxy.usage import PROVIDER

if TYPE_CHECKING:
    from proxy.services import Services

log = logging.getLogger("meterproxy.background")
TERMINAL = frozenset({"completed", "failed", "cancelled", "incomplete"})
FIRST_POLL = 2.0
LONGEST_POLL = 30.0


@dataclass
class Pending:
    response_id: str
    agent: str
    intent: str | None
    model: str | None
    upstream: str | None
    provider: str | None
    price: ModelPrice | None
    ticket: Ticket | None
    url: str  # where the proxy itself retrieves it
    headers: Mapping[str, str]  # the client's credentials, in memory only
    since: float = field(default_factory=time.monotonic)
    next_poll: float = field(default_factory=lambda: time.monotonic() + FIRST_POLL)
    interval: float = FIRST_POLL


def completion_id(response_id: str) -> str:
    return f"bg_{response_id}"


class BackgroundBook:
    def __init__(self, svc: Services, clock: Callable[[], float]) -> None:
        self.svc = svc
        self.clock = clock
        self.pending: dict[str, Pending] = {}
        self._done: set[str] = set()

    def add(self, pending: Pending) -> None:
        self.pending[pending.response_id] = pending

    async def observed(self, response_id: str | None, facts: BodyFacts) -> bool:
        """A response seen through the proxy: if it is a background one that finished,
        its cost is recorded (once). True when it was."""
        if response_id is None or facts.status not in TERMINAL or response_id in self._done:
            return False
        pending = self.pending.pop(response_id, None)
        if pending is None:
            pending = await self._from_ledger(response_id)
            if pending is None:
                return False
        await self._record(pending, facts)
        return True

    async def _from_ledger(self, response_id: str) -> Pending | None:
        """A background response created before a restart: what its create row says."""
        storage = self.svc.storage
        if await storage.call(completion_id(response_id)) is not None:
            return None
        rows = await storage.fetch(
            "SELECT agent, intent, model_requested, upstream, provider FROM calls"
            " WHERE response_id = ? AND usage_source = 'pending' LIMIT 1",
            [response_id],
        )
        if not rows:
            return None
        agent, intent, model, upstream, provider = rows[0]
        price = self.svc.prices.resolve(model) if model else None
        return Pending(response_id, agent, intent, model, upstream, provider, price, None, "", {})

    async def _record(self, p: Pending, facts: BodyFacts, error: str | None = None) -> None:
        self._done.add(p.response_id)
        now = self.clock()
        usage = facts.usage
        cost: int | None = 0
        if usage is not None:
            cost = p.price.cost(usage) if p.price is not None else None
        elif error is None:
            error = f"background response {facts.status} without usage"
        record = CallRecord(
            completion_id(p.response_id), now, now, p.agent, p.intent, p.upstream,
            "responses/background", "GET", p.model, facts.model,
            p.price.name if p.price else None, 200, False,
            cost_pico=cost, usage_source=PROVIDER if usage is not None else "none",
            price_version=self.svc.prices.version, error=error,
            reserved_pico=p.ticket.amount if p.ticket else 0, provider=p.provider,
            response_id=p.response_id,
        )  # fmt: skip
        if usage is not None:
            record.set_usage(usage)
        enforcer = self.svc.enforcer
        if p.ticket is not None:
            enforcer.settle(p.ticket, cost, now)
        elif cost:
            await enforcer.add_reported(p.agent, p.intent, cost, now)
        await self.svc.ledger.commit(record)
        self.svc.after_call(record)

    async def run(self) -> None:
        """Retrieve pending responses no client has asked for, until they finish."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for p in [p for p in self.pending.values() if p.next_poll <= now]:
                try:
                    await self._poll(p, now)
                except Exception:
                    log.exception("background response %s: retrieval failed", p.response_id)

    async def _poll(self, p: Pending, now: float) -> None:
        if now - p.since > self.svc.config.background_max_seconds:
            self.pending.pop(p.response_id, None)
            log.warning("background response %s of agent '%s' not seen to finish within"
                        " %gs: its reservation is released, its cost is unknown",
                        p.response_id, p.agent, self.svc.config.background_max_seconds)  # fmt: skip
            await self._record(p, BodyFacts(status="unknown"),
                               "background response not seen to finish")  # fmt: skip
            return
        p.interval = min(p.interval * 1.5, LONGEST_POLL)
        p.next_poll = now + p.interval
        if not p.url:
            return
        timeouts = client_timeout(self.svc.config.timeouts, False)
        r = await self.svc.upstreams.request("GET", p.url, p.headers, None, timeouts)
        try:
            if r.status != 200:
                return
            obj: Any = orjson.loads(await r.read())
        finally:
            r.release()
        facts = facts_from_body(obj)
        if facts.status in TERMINAL and p.response_id in self.pending:
            self.pending.pop(p.response_id, None)
            await self._record(p, facts)

    def release_all(self) -> None:
        """At shutdown: reservations held for responses still running are let go (the
        ledger has their create rows; a retrieval after the restart records the cost)."""
        for p in self.pending.values():
            if p.ticket is not None:
                self.svc.enforcer.settle(p.ticket, 0, self.clock())
        self.pending.clear()
