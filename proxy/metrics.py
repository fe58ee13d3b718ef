"""Prometheus metrics, produced with prometheus_client on a registry of our own.

Labels are agent and model (intent is unbounded and is never a label). Both are capped:
past `MAX_LABEL_VALUES` distinct values, new ones are counted under `other`, so a client
inventing agent names cannot blow up the scrape. Gauges of budgets and reservations are
read from the enforcer at scrape time, not kept up to date per call. What every call
counts is kept as plain numbers on the event loop's thread (`_CallCounts`) and turned
into metric families at scrape time: prometheus_client's counters take a lock per
increment, ten of them a call. Spend is summed in exact pico-USD.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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


class _Histogram:
    """One histogram's bucket counts, as plain numbers."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket holds value <= bound
        self.sum += value
        self.count += 1

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = list(accumulate(self.counts))
        buckets = [(repr(float(b)), n) for b, n in zip(self.bounds, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class _CallCounts(Collector):
    """What each call adds, on the event loop's thread (no locks), exported at scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.cost_pico: dict[tuple[str, str], int] = {}
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.refusals: dict[tuple[str, str], int] = {}
        self.shadow: dict[tuple[str, str], int] = {}
        self.overhead = _Histogram(
            (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
        )
        self.upstream = _Histogram(
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        )

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("meterproxy_requests", "Calls answered, by HTTP status",
                                       labels=["agent", "model", "status"])  # fmt: skip
        for (agent, model, status), n in self.requests.items():
            requests.add_metric([agent, model, str(status)], n)
        yield requests
        cost = CounterMetricFamily("meterproxy_cost_usd", "Spend recorded, USD",
                                   labels=["agent", "model"])  # fmt: skip
        for labels, pico in self.cost_pico.items():
            cost.add_metric(list(labels), pico / PICO)
        yield cost
        tokens = CounterMetricFamily("meterproxy_tokens", "Tokens recorded, by kind",
                                     labels=["agent", "model", "kind"])  # fmt: skip
        for (agent, model), counts in self.tokens.items():
            for kind, n in zip(TOKEN_KINDS, counts, strict=True):
                if n:
                    tokens.add_metric([agent, model, kind], n)
        yield tokens
        for name, documentation, by_limit in (
            ("meterproxy_budget_refusals", "Calls refused, by limit", self.refusals),
            ("meterproxy_budget_shadow_refusals", "Calls a dry-run (shadow) limit would have"
             " refused; they went through", self.shadow),
        ):  # fmt: skip
            family = CounterMetricFamily(name, documentation, labels=["agent", "limit"])
            for labels, n in by_limit.items():
                family.add_metric(list(labels), n)
            yield family
        yield self.overhead.family(
            "meterproxy_overhead_seconds",
            "Time a call spent in the proxy itself (total minus waiting on the upstream)",
        )
        yield self.upstream.family(
            "meterproxy_upstream_latency_seconds",
            "Time from forwarding a call to the upstream's last byte",
        )


class Metrics:
    def __init__(
        self,
        enforcer: Callable[[], Enforcer],
        now: Callable[[], float],
        extra: Callable[[], Iterator[GaugeMetricFamily | CounterMetricFamily]] = lambda: iter(()),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.heartbeats = Counter("meterproxy_heartbeats", "Heartbeats, by what became of them",
                                  ["result"], registry=r)  # fmt: skip
        self.calls = _CallCounts()
        r.register(self.calls)
        r.register(_State(enforcer, now, extra))
        self._agent = _Capped()
        self._model = _Capped()

    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool = False,
        trace: object = None,
    ) -> None:  # fmt: skip
        calls = self.calls
        agent = self._agent(record.agent)
        model = self._model(record.model_priced or record.model_requested or "-")
        key = (agent, model, record.status)
        calls.requests[key] = calls.requests.get(key, 0) + 1
        if record.refused:
            limit = (record.error or "").split(":", 1)[0] or "unknown"
            refused = (agent, limit)
            calls.refusals[refused] = calls.refusals.get(refused, 0) + 1
            return
        if record.shadow_limit is not None:
            shadow = (agent, record.shadow_limit)
            calls.shadow[shadow] = calls.shadow.get(shadow, 0) + 1
        pair = (agent, model)
        if record.cost_pico:
            calls.cost_pico[pair] = calls.cost_pico.get(pair, 0) + record.cost_pico
        counts = calls.tokens.get(pair)
        if counts is None:
            counts = calls.tokens[pair] = [0] * len(TOKEN_KINDS)
        counts[0] += record.input_tokens
        counts[1] += record.cached_input_tokens
        counts[2] += record.output_tokens
        counts[3] += record.reasoning_tokens
        counts[4] += record.cache_write_tokens
        if upstream_seconds is not None:
            calls.upstream.observe(upstream_seconds)
            calls.overhead.observe(max(record.latency_ms / 1000 - upstream_seconds, 0.0))

    def heartbeat(self, result: str) -> None:
        """`recorded`, or the error code a heartbeat was refused with (a closed set)."""
        self.heartbeats.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
