"""What the budgets look like right now, for people and scrapers: the admin API's agent
status, `/metrics` gauges, the dashboard's bars. Read-only; nothing here decides."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from proxy.admission import GLOBAL, Limit, agent_scope, plan_limits
from proxy.enforcer import Enforcer
from proxy.money import usd_exact
from proxy.policy import COST_WINDOWS
from proxy.spend_rate import Runway, runway, runway_text
from proxy.storage.base import CounterKey


def known_agents(enforcer: Enforcer) -> list[str]:
    names = enforcer.policies.names() | set(enforcer.paused) | enforcer.store.known_agents()
    return sorted(names)


def limits_of(enforcer: Enforcer, agent: str, now: float) -> Sequence[Limit]:
    """Every limit in force for the agent's calls (per-intent cost limits are per intent:
    `GET /meter/intents/...` shows them)."""
    return plan_limits(enforcer.plan(agent), agent, None, enforcer.calendar, now, views=True)


def cost_limits(enforcer: Enforcer, now: float) -> Iterator[tuple[str, Limit]]:
    """(agent, limit) for every cost limit in force; the global ones once, agent ''."""
    seen_global = False
    for agent in known_agents(enforcer):
        for lim in limits_of(enforcer, agent, now):
            if not lim.money:
                continue
            if lim.scope == GLOBAL:
                if seen_global:
                    continue
                seen_global = True
            yield "" if lim.scope == GLOBAL else agent, lim
    g = enforcer.policies.global_policy
    if g is not None and not seen_global:
        for lim in limits_of(enforcer, "", now):
            if lim.money and lim.scope == GLOBAL:
                yield "", lim


def left_of(enforcer: Enforcer, lim: Limit) -> int:
    used, reserved = enforcer.store.value(lim.key)
    return max(lim.value - used - reserved, 0)


def remaining(enforcer: Enforcer, now: float) -> Iterator[tuple[str, str, str, int]]:
    """(scope, agent, limit, pico-USD left) for every cost limit in force."""
    for agent, lim in cost_limits(enforcer, now):
        yield lim.scope, agent, lim.name, left_of(enforcer, lim)


def runway_of(enforcer: Enforcer, lim: Limit, now: float) -> Runway | None:
    """A cost limit's runway at the last 15 minutes' rate (None: a limit with no minute
    counters, e.g. an intent's lifetime)."""
    if not lim.money or lim.scope not in ("agent", GLOBAL):
        return None
    return runway(enforcer.store, lim.key.scope, left_of(enforcer, lim), now, lim.resets_at)


def status(enforcer: Enforcer, agent: str, now: float) -> dict[str, Any]:
    cal = enforcer.calendar
    policy, source = enforcer.policies.for_agent(agent)
    windows = {}
    for window in COST_WINDOWS:
        start, end = cal.window(window, now)
        used, reserved = enforcer.store.value(
            CounterKey(agent_scope(agent), f"cost:{window}", start, end)
        )
        windows[window] = {
            "spent_usd": usd_exact(used),
            "reserved_usd": usd_exact(reserved),
            "starts": cal.iso(start),
            "resets": cal.iso(end),
        }
    limits = [limit_view(enforcer, lim, now) for lim in limits_of(enforcer, agent, now)]
    paused = enforcer.paused
    return {
        "agent": agent,
        "state": "paused" if agent in paused else "active",
        "paused_reason": paused.get(agent),
        "policy_source": source,
        "policy": policy.to_json() if policy is not None else None,
        "windows": windows,
        "limits": limits,
    }


def limit_view(enforcer: Enforcer, lim: Limit, now: float) -> dict[str, Any]:
    used, reserved = enforcer.store.value(lim.key)
    left = max(lim.value - used - reserved, 0)
    view: dict[str, Any] = {"scope": lim.scope, "limit": lim.name, "action": lim.action}
    if lim.money:
        view |= {
            "limit_usd": usd_exact(lim.value),
            "spent_usd": usd_exact(used),
            "reserved_usd": usd_exact(reserved),
            "remaining_usd": usd_exact(left),
        }
    else:
        view |= {"max": lim.value, "used": used, "remaining": left}
    view["resets"] = enforcer.calendar.iso(lim.key.end) if lim.resets_at is not None else None
    way = runway_of(enforcer, lim, now)
    if way is not None:
        view["rate_usd_per_minute"] = usd_exact(way.rate_pico_per_minute)  # last 15 minutes
        view["runway_seconds"] = round(way.seconds) if way.seconds is not None else None
        # A date only within a year: a huge limit at a trickle would run out past year 9999.
        soon = way.seconds is not None and way.seconds < 366 * 86400
        view["runs_out_at"] = enforcer.calendar.iso(now + way.seconds) if soon else None  # type: ignore[operator]
        view["runs_out_before_reset"] = way.before_reset
        view["runway"] = runway_text(way.seconds)
    return view
