"""Background upkeep of budgets shared by replicas (PostgreSQL).

Every `REFRESH_SECONDS` the local view of the counters, the pauses and the API-set
policies are read from the database (so a policy set through one replica reaches the
others within a second). Every `UPKEEP_SECONDS` this replica heartbeats, releases the
reservations of replicas that stopped, and prunes counters no window uses any more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson

from proxy.enforcer import Enforcer
from proxy.pg_counters import REFRESH_SECONDS, UPKEEP_SECONDS, PgCounters
from proxy.policy import validate_policy_json
from proxy.schema import FieldError
from proxy.storage.base import StorageUnavailable

log = logging.getLogger("meterproxy.budgets")


async def refresh(enforcer: Enforcer, store: PgCounters, now: float) -> None:
    await store.refresh(now)
    api = {}
    for agent, text in (await store.db.policies()).items():
        try:
            api[agent] = validate_policy_json(orjson.loads(text))
        except (FieldError, orjson.JSONDecodeError) as e:
            log.error("policy of agent '%s' in the database is invalid: %s", agent, e)
    if api != dict(enforcer.policies.api):
        enforcer.policies = enforcer.policies.with_api(api)


async def refresh_loop(enforcer: Enforcer, store: PgCounters, clock: Callable[[], float]) -> None:
    while True:
        await asyncio.sleep(REFRESH_SECONDS)
        try:
            await refresh(enforcer, store, clock())
        except StorageUnavailable:
            pass
        except Exception:
            log.exception("refreshing shared budgets failed")


async def upkeep_loop(store: PgCounters, clock: Callable[[], float]) -> None:
    last_ok = -1e18
    while True:
        now = clock()
        # Only a replica that was itself in touch all along may call others dead: after
        # an outage every replica looks silent, and live calls hold those leases.
        trusted = now - last_ok < 2 * UPKEEP_SECONDS
        try:
            released = await store.upkeep(now, trusted)
            last_ok = now
            if released:
                log.warning("released %d reservations of replicas that stopped", released)
        except StorageUnavailable:
            pass
        except Exception:
            log.exception("shared budget upkeep failed")
        await asyncio.sleep(UPKEEP_SECONDS)
