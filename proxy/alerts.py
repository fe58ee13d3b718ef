"""Webhook alerts: budget thresholds, refusals, pauses, the loop guard, a failing upstream.

Delivery never touches a proxied call: events go into a bounded queue and one worker posts
them, with retries and backoff. When the queue is full the event is dropped and the log
says so (one WARNING per burst of drops), so a webhook that is down costs at most
`queue_size` events and never a millisecond of a call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout

from proxy import events
from proxy.config import AlertsConfig
from proxy.records import CallRecord

log = logging.getLogger("meterproxy.alerts")
# Refusal-like events repeat on every call of a stuck agent: one per key per interval.
_REPEATING = frozenset({events.REFUSED, events.LOOP, events.ALERT})
_ICONS = {
    events.THRESHOLD: ":warning:",
    events.REFUSED: ":no_entry:",
    events.ALERT: ":warning:",
    events.PAUSED: ":double_vertical_bar:",
    events.RESUMED: ":arrow_forward:",
    events.LOOP: ":repeat:",
    events.UPSTREAM_FAILING: ":rotating_light:",
}


def payload(event: events.Event, fmt: str) -> bytes:
    if fmt == "slack":
        icon = _ICONS.get(event.kind, ":bell:")
        # {"text": ...} is what Slack, Mattermost and Discord's /slack endpoint all accept.
        return orjson.dumps({"text": f"{icon} meterproxy {event.kind}: {event.message}"})
    return orjson.dumps(
        {
            "event": event.kind,
            "message": event.message,
            "agent": event.agent,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.at)),
            "data": event.data,
        }
    )


class AlertSender:
    def __init__(
        self,
        config: AlertsConfig,
        session: Callable[[], ClientSession],
        *,
        retry_delays: tuple[float, ...] = (0.5, 2.0, 5.0),
        post_timeout: float = 5.0,
    ) -> None:
        self.config = config
        self._session = session
        self.retry_delays = retry_delays
        self.post_timeout = ClientTimeout(total=post_timeout)
        self.queue: asyncio.Queue[events.Event] = asyncio.Queue(maxsize=config.queue_size)
        self._last: dict[tuple[Any, ...], float] = {}
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._dropping = False
        self.suppressed = 0

    def __call__(self, event: events.Event) -> None:
        """The event bus subscriber: never blocks."""
        if not self.config.webhooks:
            return
        if event.kind in _REPEATING:
            key = (event.kind, event.agent, event.data.get("limit"), event.data.get("subject"))
            last = self._last.get(key)
            if last is not None and event.at - last < self.config.repeat_seconds:
                self.suppressed += 1
                return
            self._last[key] = event.at
            if len(self._last) > 10_000:
                self._last.clear()
        try:
            self.queue.put_nowait(event)
            # A burst ends when the queue has drained to half: one slot freeing up and
            # filling again is the same burst, not a new WARNING.
            if self._dropping and self.queue.qsize() <= self.queue.maxsize // 2:
                self._dropping = False
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                log.warning(
                    "alert queue full (%d events waiting for webhooks that are slow or down):"
                    " dropping new alerts until it drains; %d dropped so far",
                    self.queue.qsize(),
                    self.dropped,
                )

    async def run(self) -> None:
        while True:
            event = await self.queue.get()
            try:
                for url, fmt in self.config.webhooks:
                    await self._deliver(url, fmt, event)
            finally:
                self.queue.task_done()

    async def _deliver(self, url: str, fmt: str, event: events.Event) -> None:
        body = payload(event, fmt)
        attempts = (0.0, *self.retry_delays)
        problem = ""
        for attempt, delay in enumerate(attempts, 1):
            if delay:
                await asyncio.sleep(delay)
            try:
                async with self._session().post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=self.post_timeout,
                ) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {response.status}"
                    if 400 <= response.status < 500 and response.status != 429:
                        break  # the webhook refuses this payload: retrying will not help
            except (ClientError, TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.debug(
                "alert %s to %s: attempt %d failed (%s)", event.kind, _host(url), attempt, problem
            )
        self.failed += 1
        log.error(
            "alert %s could not be delivered to %s after %d attempts (%s): %s",
            event.kind,
            _host(url),
            len(attempts),
            problem,
            event.message,
        )


def _host(url: str) -> str:
    """Webhook URLs carry secrets in their path (Slack's do): log only the host."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


class UpstreamWatch:
    """Emits `upstream_failing` once when an upstream fails N calls in a row, and again only
    after it has recovered and failed again."""

    def __init__(self, bus: events.EventBus, threshold: int = 5) -> None:
        self.bus = bus
        self.threshold = threshold
        self._streak: dict[str, int] = {}
        self._alerted: set[str] = set()

    def call_ended(
        self, record: CallRecord, upstream_seconds: float | None, forwarded: bool,
        trace: object = None,
    ) -> None:  # fmt: skip
        upstream, status, now = record.upstream, record.status, record.ended_at
        if upstream is None or not forwarded:
            return
        if status >= 500 or status == 0:
            streak = self._streak.get(upstream, 0) + 1
            self._streak[upstream] = streak
            if streak >= self.threshold and upstream not in self._alerted:
                self._alerted.add(upstream)
                self.bus.emit(
                    events.Event(
                        events.UPSTREAM_FAILING,
                        f"upstream '{upstream}' failed {streak} calls in a row (last: HTTP"
                        f" {status})",
                        now,
                        None,
                        {"upstream": upstream, "streak": streak, "status": status},
                    )
                )
        elif status < 500:
            self._streak.pop(upstream, None)
            self._alerted.discard(upstream)
