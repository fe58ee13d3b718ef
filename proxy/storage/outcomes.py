"""Intent outcomes and progress marks: the SQL (see `proxy.outcomes` for what they mean)."""

from __future__ import annotations

from typing import Any

from proxy.storage.base import Storage

_KEYS = {"agent": "c.agent", "model": "COALESCE(c.model_requested, c.model_served, '')"}


async def set_outcome(
    storage: Storage, agent: str, intent: str, outcome: str, at: float, source: str
) -> None:
    """The intent's outcome; a later one replaces it (a retried task that then succeeded)."""
    await storage.execute(
        "INSERT INTO intent_outcomes (agent, intent, outcome, outcome_at, source)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (agent, intent) DO UPDATE SET"
        " outcome = excluded.outcome, outcome_at = excluded.outcome_at, source = excluded.source",
        [agent, intent, outcome, at, source],
    )


async def set_progress(storage: Storage, agent: str, intent: str, spent: int, at: float) -> None:
    """The intent reported progress when it had spent `spent` pico-USD."""
    await storage.execute(
        "INSERT INTO intent_outcomes (agent, intent, progress_at, progress_spent_pico)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (agent, intent) DO UPDATE SET"
        " progress_at = excluded.progress_at, progress_spent_pico = excluded.progress_spent_pico",
        [agent, intent, at, spent],
    )


async def outcome_of(storage: Storage, agent: str, intent: str) -> dict[str, Any] | None:
    rows = await storage.fetch(
        "SELECT outcome, outcome_at, source, progress_at, progress_spent_pico"
        " FROM intent_outcomes WHERE agent = ? AND intent = ?",
        [agent, intent],
    )
    if not rows:
        return None
    outcome, at, source, progress_at, progress_spent = rows[0]
    return {"outcome": outcome, "outcome_at": at, "source": source,
            "progress_at": progress_at, "progress_spent_pico": progress_spent}  # fmt: skip


async def outcome_totals(
    storage: Storage, by: str, since: float | None, until: float | None, agent: str | None
) -> list[tuple[str, str, int, int, int, int]]:
    """(key, outcome or 'open', intents, cost micro-USD, pico remainder, unpriced calls) per
    key and outcome, over the calls of intents in [since, until)."""
    where = ["c.intent IS NOT NULL", "c.refused = 0"]
    params: list[Any] = []
    if since is not None:
        where.append("c.started_at >= ?")
        params.append(since)
    if until is not None:
        where.append("c.started_at < ?")
        params.append(until)
    if agent is not None:
        where.append("c.agent = ?")
        params.append(agent)
    if by == "model":
        # By model, an intent counts under the models it called: a row that neither called
        # nor spent (a status-only heartbeat, a request refused as malformed) names none.
        where.append("(c.llm_calls > 0 OR COALESCE(c.cost_pico, 0) > 0)")
    key = _KEYS[by]
    rows = await storage.fetch(
        f"SELECT {key}, COALESCE(o.outcome, 'open'), COUNT(DISTINCT c.agent || '/' || c.intent),"
        " SUM(COALESCE(c.cost_pico, 0) / 1000000), SUM(COALESCE(c.cost_pico, 0) % 1000000),"
        " SUM(CASE WHEN c.cost_pico IS NULL AND c.llm_calls > 0 THEN 1 ELSE 0 END)"
        " FROM calls c LEFT JOIN intent_outcomes o ON o.agent = c.agent AND o.intent = c.intent"
        f" WHERE {' AND '.join(where)} GROUP BY 1, 2 ORDER BY 1, 2",
        params,
    )
    return [(str(r[0]), str(r[1]), int(r[2]), int(r[3] or 0), int(r[4] or 0), int(r[5] or 0))
            for r in rows]  # fmt: skip
