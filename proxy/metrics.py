"""Prometheus metrics, produced with prometheus_client on a registry of our own.

Labels are agent and model (intent is unbounded and is never a label). Both are capped:
past `MAX_LABEL_VALUES` distinct values, new ones are counted under `other`, so a client
inventing agent names cannot blow up the scrape. Gauges of budgets and reservations are
read from the enforcer at scrape time, not kept up to date per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.budget_views import cost_limits, left_of, runway_of
from proxy.enforcer import Enforcer
from proxy.records import CallRecord

MAX_LABEL_VALUES = 1000
PICO = 1e12
TOKEN_KINDS = ("input", "cached_input", "output", "reasoning", "cache_write")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Capped:
    """Label values as seen, up to a cap; later newcomers become 'other'."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= MAX_LABEL_VALUES:
            return "other"
        self._seen.add(value)
        return value


Families = Iterator[GaugeMetricFamily | CounterMetricFamily]


class _State(Collector):
    def __init__(
        self,
        enforcer: Callable[[], Enforcer],
        now: Callable[[], float],
        extra: Callable[[], Families],
    ) -> None:
        self.enforcer = enforcer
        self.now = now
        self.extra = extra

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        enforcer = self.enforcer()
        left_usd = GaugeMetricFamily(
            "meterproxy_budget_remaining_usd",
            "What remains of each cost limit (limit - spent - reserved), USD",
            labels=["scope", "agent", "limit"],
        )
        runways = GaugeMetricFamily(
            "meterproxy_budget_runway_seconds",
            "When each cost limit runs out at the spend rate of the last 15 minutes, seconds"
            " from now (+Inf: nothing spent in that time)",
            labels=["scope", "agent", "limit"],
        )
        rates = GaugeMetricFamily(
            "meterproxy_spend_rate_usd_per_minute",
            "Spend per minute over the last 15 minutes, per scope of each cost limit",
            labels=["scope", "agent", "limit"],
        )
        now = self.now()
        for agent, lim in cost_limits(enforcer, now):
            labels = [lim.scope, agent, lim.name]
            left_usd.add_metric(labels, left_of(enforcer, lim) / PICO)
            way = runway_of(enforcer, lim, now)
            if way is not None:
                runways.add_metric(labels, way.seconds if way.seconds is not None else math.inf)
                rates.add_metric(labels, way.rate_pico_per_minute / PICO)
        yield left_usd
        yield runways
        yield rates
        yield GaugeMetricFamily(
            "meterproxy_reservations_outstanding",
            "Admitted calls whose reservation is not settled yet",
            value=enforcer.outstanding,
        )
        yield GaugeMetricFamily(
            "meterproxy_reserved_usd",
            "Budget held by outstanding reservations, USD",
            value=enforcer.outstanding_pico / PICO,
        )
        paused = GaugeMetricFamily("meterproxy_agent_paused", "1 while an agent is paused",
                                   labels=["agent"])  # fmt: skip
        for agent in sorted(enforcer.paused):
            paused.add_metric([agent], 1)
        yield paused
        yield from self.extra()


class Metrics:
    def __init__(
        self,
        enforcer: Callable[[], Enforcer],
        now: Callable[[], float],
        extra: Callable[[], Iterator[GaugeMetricFamily | CounterMetricFamily]] = lambda: iter(()),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cost = Counter("meterproxy_cost_usd", "Spend recorded, USD", ["agent", "model"],
                            registry=r)  # fmt: skip
        self.tokens = Counter("meterproxy_tokens", "Tokens recorded, by kind",
                              ["agent", "model", "kind"], registry=r)  # fmt: skip
        self.requests = Counter("meterproxy_requests", "Calls answered, by HTTP status",
                                ["agent", "model", "status"], registry=r)  # fmt: skip
        self.refusals = Counter("meterproxy_budget_refusals", "Calls refused, by limit",
                                ["agent", "limit"], registry=r)  # fmt: skip
        self.shadow = Counter("meterproxy_budget_shadow_refusals",
                              "Calls a dry-run (shadow) limit would have refused; they went"
                              " through", ["agent", "limit"], registry=r)  # fmt: skip
        self.heartbeats = Counter("meterproxy_heartbeats", "Heartbeats, by what became of them",
                                  ["result"], registry=r)  # fmt: skip
        self.overhead = Histogram(
            "meterproxy_overhead_seconds",
            "Time a call spent in the proxy itself (total minus waiting on the upstream)",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.upstream = Histogram(
            "meterproxy_upstream_latency_seconds",
            "Time from forwarding a call to the upstream's last byte",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        r.register(_State(enforcer, now, extra))
        self._agent = _Capped()
        self._model = _Capped()
        # Labelled children, looked up once: labels() costs a lock and a tuple per call.
        self._by_key: dict[tuple[str, str], tuple[Any, tuple[Any, ...]]] = {}
        self._requests: dict[tuple[str, str, int], Any] = {}

    def _children(self, agent: str, model: str) -> tuple[Any, tuple[Any, ...]]:
        """The labelled cost and token counters of one agent and model, looked up once."""
        key = (agent, model)
        found = self._by_key.get(key)
        if found is None:
            found = (
                self.cost.labels(agent, model),
                tuple(self.tokens.labels(agent, model, kind) for kind in TOKEN_KINDS),
            )
            self._by_key[key] = found
        return found

    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool = False,
        trace: object = None,
    ) -> None:  # fmt: skip
        agent = self._agent(record.agent)
        model = self._model(record.model_priced or record.model_requested or "-")
        key = (agent, model, record.status)
        requests = self._requests.get(key)
        if requests is None:
            requests = self._requests[key] = self.requests.labels(agent, model, str(record.status))
        requests.inc()
        if record.refused:
            limit = (record.error or "").split(":", 1)[0] or "unknown"
            self.refusals.labels(agent, limit).inc()
            return
        if record.shadow_limit is not None:
            self.shadow.labels(agent, record.shadow_limit).inc()
        cost, tokens = self._children(agent, model)
        if record.cost_pico:
            cost.inc(record.cost_pico / PICO)
        for counter, value in zip(
            tokens,
            (
                record.input_tokens,
                record.cached_input_tokens,
                record.output_tokens,
                record.reasoning_tokens,
                record.cache_write_tokens,
            ),
            strict=True,
        ):
            if value:
                counter.inc(value)
        if upstream_seconds is not None:
            self.upstream.observe(upstream_seconds)
            self.overhead.observe(max(record.latency_ms / 1000 - upstream_seconds, 0.0))

    def heartbeat(self, result: str) -> None:
        """`recorded`, or the error code a heartbeat was refused with (a closed set)."""
        self.heartbeats.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
