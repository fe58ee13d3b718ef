"""The application factory: `create_app(config)` with every resource in `cleanup_ctx`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from aiohttp import ClientSession, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proxy.alerts import AlertSender, UpstreamWatch
from proxy.attribution import KeyRing
from proxy.budgets import Calendar, validate_policy_json
from proxy.calllog import CallSink
from proxy.config import Config
from proxy.enforcer import Enforcer
from proxy.errors import ProxyFault
from proxy.events import EventBus
from proxy.handler import proxy_handler
from proxy.ledger import LedgerWriter
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.pricing import PriceTable, load_price_table
from proxy.reload import Reloader
from proxy.schema import FieldError
from proxy.services import SERVICES, Services
from proxy.shared_enforcer import SharedEnforcer
from proxy.spool import Spool
from proxy.storage import open_storage
from proxy.tokens import TokenCounter
from proxy.upstream import make_session

log = logging.getLogger("meterproxy")


@dataclass(frozen=True)
class Options:
    clock: Callable[[], float] = time.time
    reparse: Callable[[], Config] | None = None  # re-read the config file (hot reload)
    prices: PriceTable | None = None
    call_sink: CallSink | None = None  # where call lines go, when not through logging


OPTIONS = web.AppKey("meterproxy.options", Options)
RELOADER = web.AppKey("meterproxy.reloader", Reloader)


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
    app.cleanup_ctx.append(_services_ctx(config))
    app.router.add_route("*", "/v1/{tail:.*}", proxy_handler)
    app.router.add_route("*", "/agents/{agent}/v1/{tail:.*}", proxy_handler)
    app.router.add_get("/meter/health", health)
    app.router.add_get("/metrics", metrics)
    from proxy.admin import add_admin_routes

    add_admin_routes(app)
    return app


def _services_ctx(
    config: Config,
) -> Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        options = app[OPTIONS]
        clock = options.clock
        tokens = TokenCounter()
        loading = asyncio.create_task(asyncio.to_thread(tokens.load))
        prices = options.prices
        if prices is None:
            prices = await asyncio.to_thread(load_price_table, config.pricing_path)
        storage = await open_storage(
            config.db_url, sqlite_synchronous=config.sqlite_synchronous, pool_size=config.pool_size
        )
        bus = EventBus()
        try:
            api_policies = {
                agent: validate_policy_json(_json(text))
                for agent, text in (await storage.policies()).items()
            }
        except FieldError as e:
            await storage.close()
            raise RuntimeError(f"a policy stored in the database is invalid: {e}") from None
        calendar = Calendar(config.timezone)
        policies = config.policies.with_api(api_policies)
        thresholds = config.alerts.thresholds
        enforcer: Enforcer
        spool = None
        if storage.shared:  # budgets live in the database, shared with other replicas
            shared = SharedEnforcer(calendar, policies, bus, storage, thresholds,
                                    on_error=config.on_storage_error, clock=clock)  # fmt: skip
            spool = Spool(config.spool_dir, shared.replica)
            enforcer = shared
        else:
            enforcer = Enforcer(calendar, policies, bus, storage, thresholds=thresholds)
        await enforcer.load(storage, clock())  # open_storage has synced the rollups
        ledger = LedgerWriter(storage, spool=spool)
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
        if options.call_sink is not None:
            svc.call_sink = options.call_sink
        svc.metrics = Metrics(lambda: svc.enforcer, clock, lambda: _ledger_metrics(svc))
        svc.watch = UpstreamWatch(bus, config.alerts.upstream_failures)
        svc.alerts = AlertSender(config.alerts, lambda: _session(svc))
        bus.subscribe(svc.alerts)
        app[SERVICES] = svc
        reloader = Reloader(svc, options.reparse)
        app[RELOADER] = reloader
        background = [
            asyncio.create_task(reloader.run(), name="meterproxy-reload"),
            asyncio.create_task(svc.alerts.run(), name="meterproxy-alerts"),
        ]
        if isinstance(enforcer, SharedEnforcer):
            background += [
                asyncio.create_task(enforcer.refresh_loop(), name="meterproxy-budget-refresh"),
                asyncio.create_task(enforcer.upkeep_loop(), name="meterproxy-budget-upkeep"),
                asyncio.create_task(ledger.keep(), name="meterproxy-spool"),
            ]
        if config.retention_days is not None:
            background.append(
                asyncio.create_task(_prune(svc, config.retention_days), name="meterproxy-prune")
            )
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await ledger.close()
            if spool is not None:
                await spool.close()
            if svc.session is not None:
                await svc.session.close()
            await storage.close()

    return ctx


def _session(svc: Services) -> ClientSession:
    assert svc.session is not None
    return svc.session


def _ledger_metrics(svc: Services) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    yield GaugeMetricFamily(
        "meterproxy_ledger_backlog_rows", "Rows waiting for a commit", value=svc.ledger.backlog
    )
    yield CounterMetricFamily(
        "meterproxy_ledger_commits", "Group commits of the ledger", value=svc.ledger.commits
    )
    spool = svc.ledger.spool
    if spool is not None:
        yield GaugeMetricFamily(
            "meterproxy_database_up", "1 when the shared database answers, 0 while rows spool",
            value=0 if svc.ledger.offline else 1,
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


async def _prune(svc: Services, days: int) -> None:
    """Drop call rows past retention (rollups and intent totals stay), hourly."""
    while True:
        cutoff = svc.clock() - days * 86400
        try:
            deleted = await svc.storage.prune_calls(cutoff)
            if deleted:
                log.info("retention: pruned %d call rows older than %d days", deleted, days)
        except Exception:
            log.exception("retention: pruning failed")
        await asyncio.sleep(3600)


def _json(text: str) -> object:
    import orjson

    return orjson.loads(text)


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    if svc.config.metrics_need_token:
        from proxy.admin import authorize

        try:
            authorize(request)
        except ProxyFault as fault:
            return fault.response()
    assert svc.metrics is not None
    return web.Response(body=svc.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def health(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    # Still 200 when the database is down: every replica shares it, so a load balancer
    # taking them out would only turn a degraded service into none.
    offline = svc.ledger.offline or getattr(svc.enforcer, "database_down", False)
    return web.json_response(
        {
            "status": "degraded" if offline else "ok",
            "database": "unreachable" if offline else "ok",
            "spooled_rows": svc.ledger.spool.spooled if svc.ledger.spool else 0,
            "pricing_version": svc.prices.version,
            "ledger_backlog": svc.ledger.backlog,
            "outstanding_reservations": svc.enforcer.outstanding,
            # Which process answered: replicas and workers behind one address differ here.
            "replica": getattr(svc.enforcer, "replica", None),
            "pid": os.getpid(),
        }
    )
