"""Budget policies: the limits an agent's owner sets, parsed and validated.

A policy sets limits for a scope: one agent, `defaults` (every agent without its own),
`global` (all agents together). Pure data; the admission decision is `proxy.admission`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from proxy.bounds import MAX_COUNT, MAX_LIMIT_USD
from proxy.money import usd_to_pico
from proxy.schema import FieldError, Section

Action = Literal["block", "alert", "pause", "shadow"]
ACTIONS: tuple[Action, ...] = ("block", "alert", "pause", "shadow")
REFUSING: frozenset[str] = frozenset({"block", "pause"})  # actions that stop a call

COST_LIMITS = {
    "max_cost_per_hour_usd": "hour",
    "max_cost_per_day_usd": "day",
    "max_cost_per_week_usd": "week",
    "max_cost_per_month_usd": "month",
}
INTENT_LIMITS = {"max_intents_per_hour": "hour", "max_intents_per_day": "day"}
REQUESTS_LIMIT = "max_requests_per_minute"
INTENT_COST_LIMIT = "max_cost_per_intent_usd"
PROGRESS_LIMIT = "max_cost_per_intent_without_progress_usd"
RATE_LIMIT = "max_spend_rate"
POLICY_KEYS = (
    *COST_LIMITS,
    *INTENT_LIMITS,
    REQUESTS_LIMIT,
    INTENT_COST_LIMIT,
    PROGRESS_LIMIT,
    RATE_LIMIT,
    "action_on_breach",
    "loop_guard",
)
MAX_RATE_MINUTES = 60  # minute counters are kept this long
COST_WINDOWS = ("hour", "day", "week", "month")
INTENT_WINDOWS = ("hour", "day")
LOOP_CODE = "loop_detected"
PAUSED_CODE = "agent_paused"


@dataclass(frozen=True, slots=True)
class LoopGuard:
    max_identical_requests: int
    window_seconds: float


@dataclass(frozen=True, slots=True)
class SpendRate:
    """Spend over the last `over_minutes` compared with a fixed rate, or with the agent's
    own baseline (the median rate of this hour of the day over the last 7 days) times K,
    never below a floor (an agent idle at this hour has a baseline of 0)."""

    over_minutes: int
    per: str  # "agent", or "intent": each of the agent's intents on its own
    pico_per_minute: int | None = None
    times_baseline: float | None = None
    min_pico_per_minute: int = 0


@dataclass(frozen=True)
class Policy:
    cost: Mapping[str, int] = field(default_factory=dict)  # window -> pico-USD
    intents: Mapping[str, int] = field(default_factory=dict)  # window -> distinct intents
    requests_per_minute: int | None = None
    cost_per_intent: int | None = None
    action: Action = "block"
    loop_guard: LoopGuard | None = None
    spend_rate: SpendRate | None = None
    cost_without_progress: int | None = None  # per intent, since its last progress report
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def has_cost_limit(self) -> bool:
        return (bool(self.cost) or self.cost_per_intent is not None
                or self.cost_without_progress is not None)  # fmt: skip

    @property
    def refuses(self) -> bool:
        return self.action in REFUSING

    def to_json(self) -> dict[str, Any]:
        return dict(self.source)


def parse_policy(section: Section, *, scope: str = "agent") -> Policy:
    """A policy mapping (config or admin API); raises FieldError naming the key."""
    section.check_unknown(POLICY_KEYS)
    cost = {}
    for key, window in COST_LIMITS.items():
        amount = section.usd(key, None, max=MAX_LIMIT_USD)
        if amount is not None:
            cost[window] = usd_to_pico(amount)
    intents = {w: section.integer(k, None, min=0, max=MAX_COUNT) for k, w in INTENT_LIMITS.items()}
    action = section.choice("action_on_breach", ACTIONS, "block")
    if scope in ("global", "user") and action == "pause":
        section.fail("action_on_breach", f"pause applies to one agent; use block for {scope}")
    if scope == "user":
        for key in (*INTENT_LIMITS, INTENT_COST_LIMIT, PROGRESS_LIMIT, RATE_LIMIT, "loop_guard"):
            if section.has(key):
                section.fail(key, "an end user's policy takes cost and request limits only"
                             " (intents and the loop guard are the agent's)")  # fmt: skip
    per_intent = section.usd(INTENT_COST_LIMIT, None, max=MAX_LIMIT_USD)
    guard = None
    if section.has("loop_guard"):
        g = section.section("loop_guard")
        g.check_unknown(("max_identical_requests", "window_seconds"))
        guard = LoopGuard(
            g.integer("max_identical_requests", min=1, max=MAX_COUNT),
            g.number("window_seconds", min=0.001, max=31 * 86400),
        )
    without_progress = section.usd(PROGRESS_LIMIT, None, max=MAX_LIMIT_USD)
    rate = parse_spend_rate(section.section(RATE_LIMIT)) if section.has(RATE_LIMIT) else None
    if rate is not None and rate.times_baseline is not None and scope == "global":
        section.fail(RATE_LIMIT, "times_baseline compares one agent with its own past; use"
                     " usd_per_minute for global")  # fmt: skip
    source = {k: v for k, v in section.data.items() if v is not None}
    return Policy(
        cost=cost,
        intents={w: n for w, n in intents.items() if n is not None},
        requests_per_minute=section.integer(REQUESTS_LIMIT, None, min=0, max=MAX_COUNT),
        cost_per_intent=usd_to_pico(per_intent) if per_intent is not None else None,
        action=action,
        loop_guard=guard,
        spend_rate=rate,
        cost_without_progress=usd_to_pico(without_progress)
        if without_progress is not None
        else None,
        source=source,
    )


def parse_spend_rate(section: Section) -> SpendRate:
    section.check_unknown(
        ("usd_per_minute", "times_baseline", "min_usd_per_minute", "over_minutes", "per")
    )
    fixed = section.usd("usd_per_minute", None, max=MAX_LIMIT_USD)
    times = section.number("times_baseline", None, min=1, max=1000)
    if (fixed is None) == (times is None):
        section.fail("usd_per_minute", "give either usd_per_minute (a fixed rate) or"
                     " times_baseline (relative to the agent's usual rate), not both")  # fmt: skip
    floor = section.usd("min_usd_per_minute", None, max=MAX_LIMIT_USD)
    if floor is not None and times is None:
        section.fail("min_usd_per_minute", "is the floor of a times_baseline rate")
    per = section.choice("per", ("agent", "intent"), "agent")
    if per == "intent" and times is not None:
        section.fail("per", "an intent has no past of its own: use usd_per_minute per intent")
    return SpendRate(
        over_minutes=section.integer("over_minutes", 10, min=1, max=MAX_RATE_MINUTES),
        per=per,
        pico_per_minute=usd_to_pico(fixed) if fixed is not None else None,
        times_baseline=times,
        min_pico_per_minute=usd_to_pico(floor) if floor is not None else 0,
    )


@dataclass(frozen=True)
class PolicySet:
    """Config policies plus API-set ones; an API-set agent policy wins over the config's."""

    global_policy: Policy | None = None
    defaults: Policy | None = None
    agents: Mapping[str, Policy] = field(default_factory=dict)
    api: Mapping[str, Policy] = field(default_factory=dict)
    # Per end user of an agent (each agent's users apart): by user id as stored (hashed
    # when attribution.hash_users), else `user_defaults`.
    users: Mapping[str, Policy] = field(default_factory=dict)
    user_defaults: Policy | None = None

    def for_agent(self, agent: str) -> tuple[Policy | None, str | None]:
        if agent in self.api:
            return self.api[agent], "api"
        if agent in self.agents:
            return self.agents[agent], "config"
        if self.defaults is not None:
            return self.defaults, "defaults"
        return None, None

    def for_user(self, user: str | None) -> Policy | None:
        if user is None:
            return None
        return self.users.get(user, self.user_defaults)

    @property
    def has_user_limits(self) -> bool:
        return bool(self.users) or self.user_defaults is not None

    def with_api(self, api: Mapping[str, Policy]) -> PolicySet:
        return replace(self, api=dict(api))

    def names(self) -> set[str]:
        return set(self.agents) | set(self.api)


def parse_policies(section: Section, user_key: Callable[[str], str] = str) -> PolicySet:
    """`user_key`: a user id as written in the file -> as stored (its digest, when
    attribution.hash_users)."""
    agents = section.section("agents")
    users = section.section("users")
    user_defaults = section.section("user_defaults") if section.has("user_defaults") else None
    return PolicySet(
        global_policy=parse_policy(section.section("global"), scope="global")
        if section.has("global")
        else None,
        defaults=parse_policy(section.section("defaults")) if section.has("defaults") else None,
        agents={str(name): parse_policy(agents.section(name)) for name in agents.data},
        users={
            user_key(str(name)): parse_policy(users.section(name), scope="user")
            for name in users.data
        },
        user_defaults=parse_policy(user_defaults, scope="user") if user_defaults else None,
    )


def validate_policy_json(data: object) -> Policy:
    """A policy from the admin API; FieldError names the bad key."""
    if not isinstance(data, dict):
        raise FieldError("(body)", data, "a policy must be a JSON object")
    return parse_policy(Section(data))
