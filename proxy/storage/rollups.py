"""What a batch of call rows adds to the rollup tables and to per-intent totals.

The writer adds these in the same transaction as the rows, aggregated per batch: a burst
of calls of one agent and model is one upsert, not one per call. Only rows the batch
really inserted are counted, so a replayed row is never counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from proxy.records import CallRecord
from proxy.storage.migrations import ROLLUPS, SUMS

BUCKET_SECONDS = 900
INTENT_SUMS = ("requests", "llm_calls", "input_tokens", "output_tokens", "cost_pico", "unpriced")


def _sums(r: CallRecord) -> list[int]:
    return [
        1,
        r.llm_calls,
        int(r.refused),
        int(r.status >= 400),
        r.input_tokens,
        r.cached_input_tokens,
        r.output_tokens,
        r.reasoning_tokens,
        r.cache_write_tokens,
        r.cost_pico or 0,
        int(r.cost_pico is None and r.llm_calls > 0),
    ]


def _add(into: list[int], more: Sequence[int]) -> None:
    for i, value in enumerate(more):
        into[i] += value


def rollup_rows(records: Iterable[CallRecord]) -> dict[str, list[tuple[object, ...]]]:
    """Per rollup table: (bucket, *keys, *sums) rows to upsert."""
    wide: dict[tuple[int, str, str, str], list[int]] = {}
    for r in records:
        key = (
            int(r.started_at // BUCKET_SECONDS) * BUCKET_SECONDS,
            r.agent,
            r.model_requested or r.model_served or "",
            r.upstream or "",
        )
        acc = wide.get(key)
        if acc is None:
            wide[key] = _sums(r)
        else:
            _add(acc, _sums(r))
    out: dict[str, list[tuple[object, ...]]] = {}
    positions = {"agent": 1, "model": 2, "upstream": 3}
    for table, keys in ROLLUPS.items():
        if keys == ("agent", "model", "upstream"):
            out[table] = [(*k, *v) for k, v in wide.items()]
            continue
        narrow: dict[tuple[object, ...], list[int]] = {}
        for k, v in wide.items():
            nk = (k[0], *(k[positions[name]] for name in keys))
            acc = narrow.get(nk)
            if acc is None:
                narrow[nk] = list(v)
            else:
                _add(acc, v)
        out[table] = [(*k, *v) for k, v in narrow.items()]
    return out


def intent_rows(records: Iterable[CallRecord]) -> list[tuple[object, ...]]:
    """(intent, agent, first_seen, last_seen, *INTENT_SUMS) per intent in the batch."""
    agents: dict[str, str] = {}
    seen: dict[str, tuple[float, float]] = {}
    sums: dict[str, list[int]] = {}
    for r in records:
        if r.intent is None or r.refused:
            continue
        more = [1, r.llm_calls, r.input_tokens, r.output_tokens, r.cost_pico or 0,
                int(r.cost_pico is None and r.llm_calls > 0)]  # fmt: skip
        if r.intent not in sums:
            agents[r.intent] = r.agent
            seen[r.intent] = (r.started_at, r.started_at)
            sums[r.intent] = more
        else:
            first, last = seen[r.intent]
            seen[r.intent] = (min(first, r.started_at), max(last, r.started_at))
            _add(sums[r.intent], more)
    return [(i, agents[i], *seen[i], *sums[i]) for i in sums]


def upsert_sql(dialect: str) -> dict[str, str]:
    """The upsert statement of each rollup table and of `intents` (`?` placeholders)."""
    out = {}
    for table, keys in ROLLUPS.items():
        columns = ("bucket", *keys, *SUMS)
        update = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in SUMS)
        out[table] = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
            f" ON CONFLICT (bucket, {', '.join(keys)}) DO UPDATE SET {update}"
        )
    least, greatest = ("min", "max") if dialect == "sqlite" else ("LEAST", "GREATEST")
    columns = ("intent", "agent", "first_seen", "last_seen", *INTENT_SUMS)
    update = ", ".join(f"{c} = intents.{c} + excluded.{c}" for c in INTENT_SUMS)
    out["intents"] = (
        f"INSERT INTO intents ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        f" ON CONFLICT (intent) DO UPDATE SET"
        f" first_seen = {least}(intents.first_seen, excluded.first_seen),"
        f" last_seen = {greatest}(intents.last_seen, excluded.last_seen), {update}"
    )
    return out
