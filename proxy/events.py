"""The one place budget and health events go through; alerts and metrics subscribe to it.

`emit` calls subscribers synchronously: a subscriber must only enqueue (never block), so an
event costs the hot path a function call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("meterproxy.events")

THRESHOLD = "budget_threshold"  # spend crossed a configured fraction of a limit
REFUSED = "budget_refused"  # a call was refused (block/pause limit, pause, loop guard)
ALERT = "budget_alert"  # a limit with action_on_breach: alert was breached; call went through
SHADOW = "budget_shadow_refusal"  # a dry-run (shadow) limit would have refused; call went through
PAUSED = "agent_paused"
RESUMED = "agent_resumed"
LOOP = "loop_detected"
UPSTREAM_FAILING = "upstream_failing"
RUNWAY = "budget_runway"  # a limit will run out soon at the current rate, before it resets
INTENT_CLOSED = "intent_closed"  # an intent ended with an outcome (success, failure, ...)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    message: str
    at: float
    agent: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber failed on %s", event.kind)
