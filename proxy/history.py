"""What past calls tell a reservation: how long this agent's answers from this model run,
and how long a conversation it continues already is.

Both are kept in memory as calls end, and looked up in the ledger the first time a key is
needed (a restart forgets nothing the ledger has).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque

from proxy.storage import Storage

KEEP = 100  # recent outputs per (agent, model)
PERCENTILE = 0.95
_MAX_KEYS = 10_000
_MAX_CHAINS = 100_000


class OutputHistory:
    """Output tokens of an agent's recent calls per model, for the expected size of the
    next uncapped one (a high percentile, not the model's maximum)."""

    def __init__(self, storage: Storage | None) -> None:
        self.storage = storage
        self._outputs: OrderedDict[tuple[str, str], _Recent] = OrderedDict()

    def expected_if_loaded(self, agent: str, model: str) -> tuple[bool, int | None]:
        """`expected()` without a coroutine, when the key is in memory: (False, None) if
        it is not (the ledger must be read)."""
        outputs = self._outputs.get((agent, model))
        return (False, None) if outputs is None else (True, outputs.percentile())

    async def expected(self, agent: str, model: str) -> int | None:
        loaded, recent = self.expected_if_loaded(agent, model)
        if loaded:
            return recent
        outputs = _Recent()
        if self.storage is not None:
            rows = await self.storage.fetch(
                "SELECT output_tokens FROM calls WHERE agent = ? AND model_priced = ?"
                " AND usage_source = 'provider' AND llm_calls > 0 AND status < 400"
                " ORDER BY started_at DESC LIMIT ?",
                [agent, model, KEEP],
            )
            for r in reversed(rows):
                outputs.add(int(r[0]))
        self._remember((agent, model), outputs)
        return outputs.percentile()

    def record(self, agent: str, model: str, output_tokens: int) -> None:
        outputs = self._outputs.get((agent, model))
        if outputs is not None:  # a key not loaded yet will read this row from the ledger
            outputs.add(output_tokens)

    def _remember(self, key: tuple[str, str], outputs: _Recent) -> None:
        self._outputs[key] = outputs
        if len(self._outputs) > _MAX_KEYS:
            self._outputs.popitem(last=False)


class _Recent:
    """The last KEEP outputs, in arrival order and in rank order: every call asks for the
    percentile, so it is read off a sorted list kept as they come, not sorted per call."""

    __slots__ = ("arrived", "ranked")

    def __init__(self) -> None:
        self.arrived: deque[int] = deque()
        self.ranked: list[int] = []

    def add(self, tokens: int) -> None:
        if len(self.arrived) == KEEP:
            del self.ranked[bisect.bisect_left(self.ranked, self.arrived.popleft())]
        self.arrived.append(tokens)
        bisect.insort(self.ranked, tokens)

    def percentile(self) -> int | None:
        ranked = self.ranked
        if not ranked:
            return None
        return ranked[min(len(ranked) - 1, math.ceil(PERCENTILE * len(ranked)) - 1)]


class ChainBook:
    """Tokens a Responses chain carries into its next turn: the last response's input plus
    its output (`previous_response_id`), or a conversation's latest (`conversation`)."""

    def __init__(self, storage: Storage | None) -> None:
        self.storage = storage
        self._tokens: OrderedDict[str, int] = OrderedDict()

    def record(self, key: str, tokens: int) -> None:
        self._tokens[key] = tokens
        self._tokens.move_to_end(key)
        if len(self._tokens) > _MAX_CHAINS:
            self._tokens.popitem(last=False)

    async def tokens(self, response_id: str) -> int | None:
        """The context a response leaves behind; None when the proxy never saw it."""
        known = self._tokens.get(response_id)
        if known is not None or self.storage is None:
            return known
        rows = await self.storage.fetch(
            "SELECT input_tokens + output_tokens FROM calls WHERE response_id = ?"
            " ORDER BY started_at DESC LIMIT 1",
            [response_id],
        )
        if not rows:
            return None
        self.record(response_id, int(rows[0][0]))
        return int(rows[0][0])

    def conversation(self, conversation: str) -> int | None:
        return self._tokens.get(f"conversation:{conversation}")
