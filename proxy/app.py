"""The application factory: `create_app(config)`, every resource in a `cleanup_ctx` of its
own, opened in order and closed in reverse (a failure half-way closes what was opened)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import orjson
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proxy import budget_sync
from proxy.admin import admin_routes
from proxy.admin_base import authorize
from proxy.alerts import AlertSender, UpstreamWatch
from proxy.attribution import KeyRing
from proxy.calllog import CallSink
from proxy.config import Config
from proxy.counters import MemoryCounters
from proxy.enforcer import Enforcer
from proxy.errors import ProxyFault
from proxy.events import EventBus
from proxy.handler import proxy_handler
from proxy.history import ChainBook, OutputHistory
from proxy.ledger import LedgerWriter
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.outcomes import ProgressBook
from proxy.pg_counters import PgCounters
from proxy.policy import validate_policy_json
from proxy.pricing import PriceTable, load_price_table
from proxy.reload import Reloader
from proxy.schema import FieldError
from proxy.security import guard, no_route
from proxy.services import SERVICES, Services
from proxy.spend_rate import Baselines, RateWatch
from proxy.spool import Spool
from proxy.storage import Storage, StorageError, open_storage
from proxy.storage.postgres import PostgresStorage
from proxy.tokens import TokenCounter
from proxy.upstream import make_session
from proxy.windows import Calendar

log = logging.getLogger("meterproxy")


@dataclass(frozen=True)
class Options:
    clock: Callable[[], float] = time.time
    reparse: Callable[[], Config] | None = None  # re-read the config file (hot reload)
    prices: PriceTable | None = None
    call_sink: CallSink | None = None  # where call lines go, when not through logging


OPTIONS = web.AppKey("meterproxy.options", Options)
RELOADER = web.AppKey("meterproxy.reloader", Reloader)
_STORAGE = web.AppKey("meterproxy.storage", Storage)


def runner_options(config: Config) -> dict[str, object]:
    """How the HTTP server around the app must run (the CLI and the tests use the same)."""
    return {
        "access_log": None,  # the call log line says more
        "shutdown_timeout": config.shutdown_grace_seconds,
        "keepalive_timeout": config.keepalive_timeout,
        # After refusing a body (413, 408) read what still comes for this long, so the
        # client gets the answer rather than a reset; then hang up.
        "lingering_time": 2.0,
        # A client that leaves cancels its call at once: the upstream request is dropped
        # and the reservation released now, not when the upstream next sends a byte.
        "handler_cancellation": True,
    }


def create_app(config: Config, options: Options | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes)
    app[OPTIONS] = options or Options()
    app.cleanup_ctx.append(_storage_ctx(config))
    app.cleanup_ctx.append(_services_ctx(config))
    app.cleanup_ctx.append(_background_ctx)
    routes: list[web.RouteDef] = []
    for prefix in ("v1", "v1beta", "openai", "upload"):
        handler = proxy_handler(prefix)
        routes.append(web.route("*", f"/{prefix}/{{tail:.*}}", handler))
        routes.append(web.route("*", f"/agents/{{agent}}/{prefix}/{{tail:.*}}", handler))
    routes.append(web.get("/meter/health", health))

    async def metrics(request: web.Request) -> web.Response:
        svc = request.app[SERVICES]
        if svc.config.metrics_need_token:
            try:
                authorize(request)
            except ProxyFault as fault:
                return fault.response()
        assert svc.metrics is not None
        return web.Response(body=svc.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    routes.append(web.get("/metrics", metrics))
    routes.extend(admin_routes())
    # Last: a browser's preflight to a path that has no OPTIONS route of its own.
    routes.append(web.route("OPTIONS", "/{tail:.*}", no_route))
    app.add_routes([web.RouteDef(d.method, d.path, guard(d.handler), d.kwargs) for d in routes])
    return app


def _storage_ctx(
    config: Config,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        storage = await open_storage(
            config.db_url, sqlite_synchronous=config.sqlite_synchronous, pool_size=config.pool_size
        )
        app[_STORAGE] = storage
        try:
            yield
        finally:
            svc = app.get(SERVICES)
            await storage.close(svc.grace_left() if svc is not None else 10.0)

    return ctx


def _services_ctx(
    config: Config,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        options = app[OPTIONS]
        clock = options.clock
        storage = app[_STORAGE]
        tokens = TokenCounter()
        loading = asyncio.create_task(asyncio.to_thread(tokens.load))
        prices = options.prices
        if prices is None:
            prices = await asyncio.to_thread(load_price_table, config.pricing_path)
        try:
            api_policies = {
                agent: validate_policy_json(orjson.loads(text))
                for agent, text in (await storage.policies()).items()
            }
        except FieldError as e:
            raise StorageError(f"a policy stored in the database is invalid: {e}") from None
        calendar = Calendar(config.timezone)
        policies = config.policies.with_api(api_policies)
        bus = EventBus()
        spool = None
        store: MemoryCounters | PgCounters
        if isinstance(storage, PostgresStorage):  # budgets shared with other replicas
            store = PgCounters(storage, calendar)
            spool = Spool(config.spool_dir, store.replica)
        else:
            store = MemoryCounters(storage)
        shared = isinstance(store, PgCounters)
        enforcer = Enforcer(
            calendar, policies, bus, store, config.alerts.thresholds,
            on_error=config.on_storage_error,
            rates=RateWatch(Baselines(storage.rollup_buckets, calendar)),
            # With replicas, progress may be reported through another one: read again.
            progress=ProgressBook(storage, ttl=5.0 if shared else None),
            runway_seconds=config.alerts.runway_seconds,
        )  # fmt: skip
        if isinstance(store, PgCounters):
            store.plan_for = enforcer.plan
            await budget_sync.refresh(enforcer, store, clock())
        else:
            await store.load(storage, calendar, clock())  # open_storage synced the rollups
        ledger = LedgerWriter(
            storage,
            spool=spool,
            spend_keys=store.spend_keys if isinstance(store, PgCounters) else None,
            commit_timeout=config.commit_timeout,
            stall_seconds=config.stall_seconds,
            quarantine_file=config.spool_dir / "quarantine.jsonl",
            clock=clock,
        )
        await loading
        svc = Services(
            config=config,
            prices=prices,
            storage=storage,
            ledger=ledger,
            enforcer=enforcer,
            tokens=tokens,
            bus=bus,
            clock=clock,
            session=make_session(),
            keys=KeyRing(config.keys),
        )
        if any(u.base_url.startswith("https:") for u in config.upstreams):
            await svc.upstreams.tls()  # read now, not on the loop of the first call
        svc.history = OutputHistory(storage)
        svc.chains = ChainBook(storage)
        if options.call_sink is not None:
            svc.call_sink = options.call_sink
        svc.metrics = Metrics(lambda: svc.enforcer, clock, lambda: _ledger_metrics(svc))
        svc.watch = UpstreamWatch(bus, config.alerts.upstream_failures)
        svc.observers = [svc.metrics, svc.watch]
        telemetry = None
        if config.telemetry.enabled:
            from proxy.telemetry import Telemetry  # the SDK is loaded only when it is used

            telemetry = Telemetry(config.telemetry)
            svc.observers.append(telemetry)
            log.info("telemetry: OTLP spans and metrics to %s as service '%s'",
                     config.telemetry.endpoint, config.telemetry.service_name)  # fmt: skip
        svc.telemetry = telemetry
        svc.alerts = AlertSender(config.alerts, svc.client)
        bus.subscribe(svc.alerts)
        app[SERVICES] = svc
        app[RELOADER] = Reloader(svc, options.reparse)
        try:
            yield
        finally:
            svc.background.release_all()
            await ledger.close(svc.grace_left())
            if telemetry is not None:
                await telemetry.shutdown(min(5.0, max(svc.grace_left(), 0.5)))
            if spool is not None:
                await spool.close()
            await svc.client().close()
            await svc.upstreams.close()

    return ctx


@contextlib.asynccontextmanager
async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    tasks = [
        asyncio.create_task(app[RELOADER].run(), name="meterproxy-reload"),
        asyncio.create_task(svc.alerts.run(), name="meterproxy-alerts"),  # type: ignore[union-attr]
        asyncio.create_task(svc.background.run(), name="meterproxy-background"),
    ]
    store = svc.enforcer.store
    if isinstance(store, PgCounters):
        tasks += [
            asyncio.create_task(
                budget_sync.refresh_loop(svc.enforcer, store, svc.clock),
                name="meterproxy-budget-refresh",
            ),
            asyncio.create_task(
                budget_sync.upkeep_loop(store, svc.clock), name="meterproxy-budget-upkeep"
            ),
            asyncio.create_task(svc.ledger.keep(), name="meterproxy-spool"),
        ]
    tasks.append(asyncio.create_task(_prune(svc), name="meterproxy-prune"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ledger_metrics(svc: Services) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    ledger = svc.ledger
    yield GaugeMetricFamily(
        "meterproxy_ledger_backlog_rows", "Rows waiting for a commit", value=ledger.backlog
    )
    yield CounterMetricFamily(
        "meterproxy_ledger_commits", "Group commits of the ledger", value=ledger.commits
    )
    yield CounterMetricFamily(
        "meterproxy_ledger_quarantined_rows", "Rows the ledger could not store, set aside",
        value=ledger.quarantined,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "meterproxy_ledger_seconds_since_commit",
        "How long rows have been waiting without a commit (0: nothing waits)",
        value=ledger.seconds_since_progress,
    )
    yield GaugeMetricFamily(
        "meterproxy_ledger_stalled", "1 while rows have waited storage.stall_seconds or more",
        value=1 if ledger.stalled else 0,
    )  # fmt: skip
    yield CounterMetricFamily(
        "meterproxy_ledger_unconfirmed_answers",
        "Calls answered before their row was committed (a commit took longer than"
        " storage.commit_timeout_seconds)",
        value=ledger.unconfirmed,
    )
    spool = ledger.spool
    if spool is not None:
        yield GaugeMetricFamily(
            "meterproxy_database_up", "1 when the shared database answers, 0 while rows spool",
            value=0 if ledger.offline else 1,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meterproxy_ledger_spooled_rows", "Rows written to the local spool (database down)",
            value=spool.spooled,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meterproxy_ledger_replayed_rows", "Spooled rows replayed into the database",
            value=spool.replayed,
        )  # fmt: skip
    if svc.alerts is not None:
        yield CounterMetricFamily(
            "meterproxy_alerts_dropped", "Alerts dropped: the queue was full",
            value=svc.alerts.dropped,
        )  # fmt: skip
        yield CounterMetricFamily(
            "meterproxy_alerts_failed", "Alerts not delivered after every retry",
            value=svc.alerts.failed,
        )  # fmt: skip


async def _prune(svc: Services) -> None:
    """Drop call rows past retention (rollups and intent totals stay), hourly; the
    retention in force is read each time (it reloads)."""
    while True:
        days = svc.config.retention_days
        if days is not None:
            try:
                deleted = await svc.storage.prune_calls(svc.clock() - days * 86400)
                if deleted:
                    log.info("retention: pruned %d call rows older than %d days", deleted, days)
            except Exception:
                log.exception("retention: pruning failed")
        await asyncio.sleep(3600 if days is not None else 60)


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ledger = svc.ledger
    # Still 200 when degraded: every replica shares the database, so a load balancer
    # taking them out would only turn a degraded service into none.
    offline = ledger.offline or svc.enforcer.database_down
    problems = []
    if offline:
        problems.append("database unreachable")
    if ledger.stalled:
        problems.append(
            f"ledger: no commit for {ledger.seconds_since_progress:.0f}s with"
            f" {ledger.backlog} rows waiting"
        )
    store = svc.enforcer.store
    return web.json_response(
        {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "database": "unreachable" if offline else "ok",
            "ledger": "stalled" if ledger.stalled else "ok",
            "spooled_rows": ledger.spool.spooled if ledger.spool else 0,
            "quarantined_rows": ledger.quarantined,
            "pricing_version": svc.prices.version,
            "ledger_backlog": ledger.backlog,
            "outstanding_reservations": svc.enforcer.outstanding,
            # Which process answered: replicas and workers behind one address differ here.
            "replica": store.replica if isinstance(store, PgCounters) else None,
            "pid": os.getpid(),
        }
    )
