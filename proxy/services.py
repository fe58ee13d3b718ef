"""What a request handler needs, gathered in one object under one typed app key."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from aiohttp import ClientSession, web

from proxy.alerts import AlertSender, UpstreamWatch
from proxy.attribution import KeyRing
from proxy.background import BackgroundBook
from proxy.calllog import CallSink, log_call
from proxy.config import Config
from proxy.enforcer import Enforcer
from proxy.events import INTENT_CLOSED, Event, EventBus
from proxy.history import ChainBook, OutputHistory
from proxy.ledger import LedgerWriter
from proxy.metrics import Metrics
from proxy.observers import CallObserver
from proxy.pricing import PriceTable
from proxy.records import CallRecord
from proxy.storage import Storage
from proxy.storage.outcomes import set_outcome
from proxy.tokens import TokenCounter
from proxy.upstream_client import UpstreamClient


class RequestIds:
    """`req_` + 12 random hex digits per process + a counter: unique, and no uuid4 per call."""

    def __init__(self) -> None:
        self._prefix = "req_" + os.urandom(6).hex()
        self._next = count(1).__next__

    def __call__(self) -> str:
        return f"{self._prefix}{self._next():07x}"


@dataclass
class Services:
    config: Config
    prices: PriceTable
    storage: Storage
    ledger: LedgerWriter
    enforcer: Enforcer
    tokens: TokenCounter
    bus: EventBus
    clock: Callable[[], float]
    upstreams: UpstreamClient = field(default_factory=UpstreamClient)  # every upstream call
    session: ClientSession | None = None  # the proxy's own requests (alert webhooks)
    keys: KeyRing = field(default_factory=lambda: KeyRing({}))
    new_id: RequestIds = field(default_factory=RequestIds)
    warned_models: set[str] = field(default_factory=set)
    inflight: set[asyncio.Task[object]] = field(default_factory=set)  # calls being served
    shutting_down: bool = False  # set when calls in flight are being cancelled
    stop_deadline: float | None = None  # time.monotonic() by which a shutdown must be done
    metrics: Metrics | None = None
    alerts: AlertSender | None = None
    watch: UpstreamWatch | None = None
    call_sink: CallSink = log_call  # `serve` swaps in a direct writer (see calllog)
    observers: list[CallObserver] = field(default_factory=list)
    telemetry: Any = None  # proxy.telemetry.Telemetry when telemetry.enabled
    history: OutputHistory = field(default_factory=lambda: OutputHistory(None))
    chains: ChainBook = field(default_factory=lambda: ChainBook(None))
    background: BackgroundBook = field(init=False)
    chores: set[asyncio.Task[None]] = field(default_factory=set)  # off-path writes in flight

    def __post_init__(self) -> None:
        self.background = BackgroundBook(self, self.clock)

    def grace_left(self) -> float:
        """What remains of the shutdown's grace period (all of it before one starts)."""
        if self.stop_deadline is None:
            return self.config.shutdown_grace_seconds
        return max(self.stop_deadline - time.monotonic(), 0.5)

    def client(self) -> ClientSession:
        """The shared session of the proxy's own requests (webhooks)."""
        assert self.session is not None
        return self.session

    def after_call(
        self, record: CallRecord, upstream_seconds: float | None = None, forwarded: bool = False,
        trace: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        """Once per ledger row: the log line, then every observer (metrics, the upstreams'
        health, telemetry). Observers only count or enqueue: this is the hot path."""
        self.call_sink(record, self.enforcer.spent(record.agent, "day", record.started_at))
        for observer in self.observers:
            observer.call_ended(record, upstream_seconds, forwarded, trace)

    async def close_intent(
        self, agent: str, intent: str, outcome: str, source: str, now: float
    ) -> None:
        """The intent ended with `outcome`: stored, and counted as progress."""
        await self.enforcer.record_progress(agent, intent, now)
        await set_outcome(self.storage, agent, intent, outcome, now, source)
        self.bus.emit(Event(INTENT_CLOSED, f"intent '{intent}' of agent '{agent}': {outcome}",
                            now, agent, {"intent": intent, "outcome": outcome,
                                         "source": source}))  # fmt: skip

    def chore(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run `work` off the call's path; a failure is logged, never lost silently."""

        async def run() -> None:
            try:
                await work
            except Exception as e:
                logging.getLogger("meterproxy").error("%s failed: %s", what, e)

        task = asyncio.ensure_future(run())
        self.chores.add(task)
        task.add_done_callback(self.chores.discard)

    def apply_config(self, config: Config) -> None:
        """Swap in a reloaded config. What is read at each use applies by itself; this
        rebuilds what was built from it (see `proxy.reload.RULES`)."""
        self.config = config
        self.keys = KeyRing(config.keys)
        enforcer = self.enforcer
        enforcer.policies = config.policies.with_api(enforcer.policies.api)
        enforcer.crossings.thresholds = tuple(sorted(config.alerts.thresholds))
        enforcer.on_error = config.on_storage_error
        enforcer.crossings.runway_seconds = config.alerts.runway_seconds
        self.ledger.commit_timeout = config.commit_timeout
        self.ledger.stall_seconds = config.stall_seconds
        if self.alerts is not None:
            self.alerts.config = config.alerts
        if self.watch is not None:
            self.watch.threshold = config.alerts.upstream_failures
        logging.getLogger("meterproxy").setLevel(config.log_level)


SERVICES = web.AppKey("meterproxy.services", Services)
