"""A stream metered as it flows: its reservation extended slice by slice, and the stream
cut when the budget cannot pay for the next slice.

Output is counted from the text of the events as they pass: a cheap upper bound (one
token per byte of text) until the running cost nears the reservation, then tiktoken over
what came since the last look (pieces joined 64 at a time, to hold one string, not
thousands). A provider streams whole tokens per event, so counting pieces apart matches
its count; a word split across two pieces counts one token more, never less: the cut
comes a token early, never late. (Counting the whole slice again at each look is O(n^2)
per slice: at 1,000 open streams it took two thirds of the CPU.)

At 80% of the reservation the next slice is asked for, in the background, so the
database round trip (shared budgets) is not on the way of the events; a stream only
waits for it when it has used its whole reservation first. When a slice is refused and
the reservation is used, the stream is cut: what was generated up to there (and billed)
is what the client got.

Reasoning tokens a stream does not show (OpenAI's o- and gpt-5 series, Gemini 2.5) cannot
be counted this way: those streams are capped instead (`proxy.reservation`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.counters import Ticket
from proxy.enforcer import Enforcer, Refusal
from proxy.tokens import TokenCounter

EARLY = 0.8  # ask for the next slice at this share of the reservation
_JOIN_PIECES = 64  # uncounted pieces of text joined into one string past this many


class StreamBudget:
    def __init__(
        self,
        enforcer: Enforcer,
        ticket: Ticket,
        tokens: TokenCounter,
        model: str | None,
        input_cost: int,
        rate: int,
        slice_tokens: int,
        clock: Callable[[], float],
    ) -> None:
        self.enforcer = enforcer
        self.ticket = ticket
        self.tokens = tokens
        self.model = model
        self.input_cost = input_cost
        self.rate = rate
        self.slice_cost = slice_tokens * rate
        self.clock = clock
        self.counted = 0  # output tokens of the slices before this one (tiktoken)
        self._segment_tokens = 0  # tokens of this slice counted so far
        self._uncounted: list[str] = []  # text since the last count
        self._loose = 0  # its bytes: an upper bound of its tokens
        self._step = 0  # the most tokens one read brought: what may still be in flight
        self._extension: asyncio.Task[Refusal | None] | None = None
        self.refusal: Refusal | None = None
        self.extensions = 0

    @property
    def spent_bound(self) -> int:
        """An upper bound of what the stream has cost so far."""
        return self.input_cost + (self.counted + self._segment_tokens + self._loose) * self.rate

    def note(self, texts: list[str]) -> bool:
        """Account for newly generated text (every read: kept cheap); True when `after()`
        must look, near the end of the reservation."""
        if texts:
            self._uncounted.extend(texts)
            for text in texts:
                self._loose += len(text) if text.isascii() else len(text.encode())
            if len(self._uncounted) > _JOIN_PIECES:  # far from the end: held a while
                self._uncounted[:] = ["".join(self._uncounted)]
        return self.refusal is not None or self.spent_bound >= EARLY * self.ticket.amount

    async def after(self) -> Refusal | None:
        """After `note()` said so: a Refusal means cut the stream now."""
        self._count()
        if self.refusal is not None:
            # No more reservation came: stop while what is still on its way (a chunk or
            # two the provider generated before it sees the cut) fits in what is left. But
            # ask once more first: streams that ended meanwhile may have left room.
            margin = 2 * self._step * self.rate
            if self.spent_bound + margin <= self.ticket.amount:
                return None
            last = await self.enforcer.extend(self.ticket, self._next_slice(), self.clock())
            if last is not None:
                self.refusal = last
                return last
            self.extensions += 1
            self._close_segment()
            self.refusal = None
            return None
        if self.spent_bound >= EARLY * self.ticket.amount:
            self._ask()
        if self.spent_bound <= self.ticket.amount:
            return None
        while self.spent_bound > self.ticket.amount:  # the reservation is used up
            if self._extension is None:
                self._ask()
            if self._extension is None:  # refused before
                return self.refusal
            await asyncio.shield(self._extension)
        return None

    def _count(self) -> None:
        """The text since the last count, counted (each piece apart: see the module)."""
        if self._uncounted:
            step = self.tokens.count(self.model, self._uncounted)
            self._segment_tokens += step
            self._step = max(self._step, step)
            self._uncounted.clear()
            self._loose = 0

    def _close_segment(self) -> None:
        """A new slice: what came before is counted for good."""
        self._count()
        self.counted += self._segment_tokens
        self._segment_tokens = 0

    def _next_slice(self) -> int:
        """A slice, or what the budget still has when that is less (the last slice)."""
        ticket = self.ticket
        headroom = self.enforcer.headroom(ticket.agent, ticket.intent, self.clock(), ticket.user)
        if headroom is not None and self.rate <= headroom < self.slice_cost:
            return headroom
        return self.slice_cost

    def _ask(self) -> None:
        if self._extension is not None or self.refusal is not None:
            return
        self._extension = asyncio.ensure_future(
            self.enforcer.extend(self.ticket, self._next_slice(), self.clock())
        )
        self._extension.add_done_callback(self._extended)

    def _extended(self, task: asyncio.Task[Refusal | None]) -> None:
        self._extension = None
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:  # a budget that cannot be read cannot be extended
            self.refusal = Refusal("budget_exceeded", f"the budget could not be extended ({error})")
            return
        refusal = task.result()
        if refusal is None:
            self.extensions += 1
            self._close_segment()
        else:
            self.refusal = refusal

    async def settled(self) -> None:
        """Wait for a slice still being asked for: the call settles after it, never
        before (a reservation granted after its call settled would never be released)."""
        if self._extension is not None:
            await asyncio.shield(self._extension)
