"""Rollups and per-intent totals, computed by the database from call rows.

Each statement is an `INSERT ... SELECT ... GROUP BY ... ON CONFLICT DO UPDATE`: the
database aggregates (a burst of calls of one agent and model becomes one upsert) and no
Python runs per row. SQLite counts committed rows past a progress mark
(`rollup_progress`), off the write path; PostgreSQL, shared by replicas, counts the rows a
transaction really inserted, in that transaction. Either way a replayed row (same id,
`ON CONFLICT DO NOTHING`) is never counted twice.

Money is summed as two integers, whole micro-USD and the pico-USD remainder (see
migration m005): a sum of 64-bit costs could overflow 64 bits, these cannot below
$9.2 trillion. `Totals.cost_pico` joins them again, exactly.
"""

from __future__ import annotations

BUCKET_SECONDS = 900
# The rollup tables and their key columns besides the bucket (wide one first: it serves
# agent-filtered reports; the narrow ones serve unfiltered reports, with far fewer rows).
ROLLUPS = {
    "rollup_15m": ("agent", "model", "upstream"),
    "rollup_agent_15m": ("agent",),
    "rollup_model_15m": ("model",),
    "rollup_upstream_15m": ("upstream",),
}
# Their sum columns, and what each call row adds to them (same order; reports use both).
SUMS = (
    "requests",
    "llm_calls",
    "refused",
    "errors",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "cost_micro",
    "cost_pico_rem",
    "unpriced",
    "shadowed",  # calls a dry-run (shadow) limit would have refused; since migration 008
)
COST_MICRO = "COALESCE(cost_pico, 0) / 1000000"
COST_REM = "COALESCE(cost_pico, 0) % 1000000"
CALL_SUMS = (
    "COUNT(*)",
    "SUM(llm_calls)",
    "SUM(refused)",
    "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END)",
    "SUM(input_tokens)",
    "SUM(cached_input_tokens)",
    "SUM(output_tokens)",
    "SUM(reasoning_tokens)",
    "SUM(cache_write_tokens)",
    f"SUM({COST_MICRO})",
    f"SUM({COST_REM})",
    "SUM(CASE WHEN cost_pico IS NULL AND llm_calls > 0 THEN 1 ELSE 0 END)",
    "SUM(CASE WHEN shadow_limit IS NOT NULL THEN 1 ELSE 0 END)",
)
assert len(CALL_SUMS) == len(SUMS)
KEY_EXPRESSIONS = {
    "agent": "agent",
    "intent": "COALESCE(intent, '')",
    "model": "COALESCE(model_requested, model_served, '')",
    "upstream": "COALESCE(upstream, '')",
    "provider": "COALESCE(provider, '')",
    "user": "COALESCE(end_user, '')",
    "tag": "COALESCE(tags, '')",  # split into one key's values by the report layer
}
INTENT_SUMS = (
    "requests",
    "llm_calls",
    "input_tokens",
    "output_tokens",
    "cost_micro",
    "cost_pico_rem",
    "unpriced",
)
_INTENT_VALUES = (
    "COUNT(*)",
    "SUM(llm_calls)",
    "SUM(input_tokens)",
    "SUM(output_tokens)",
    f"SUM({COST_MICRO})",
    f"SUM({COST_REM})",
    "SUM(CASE WHEN cost_pico IS NULL AND llm_calls > 0 THEN 1 ELSE 0 END)",
)


def rollup_statements(dialect: str, where: str) -> list[str]:
    """Statements adding the call rows selected by `where` to every rollup and to the
    intent totals (`?` placeholders in `where`, the same parameters for each)."""
    if dialect == "sqlite":
        bucket = f"CAST(started_at / {BUCKET_SECONDS} AS INTEGER) * {BUCKET_SECONDS}"
        least, greatest = "min", "max"
        order = ""
    else:
        bucket = f"CAST(floor(started_at / {BUCKET_SECONDS}) AS BIGINT) * {BUCKET_SECONDS}"
        least, greatest = "LEAST", "GREATEST"
        # Replicas upsert the same rollup rows concurrently: in key order, they cannot
        # deadlock (one waits for the other instead).
        order = " ORDER BY {}"
    out = []
    for table, keys in ROLLUPS.items():
        columns = ("bucket", *keys, *SUMS)
        key_sql = ", ".join(KEY_EXPRESSIONS[k] for k in keys)
        groups = ", ".join(str(i) for i in range(1, len(keys) + 2))
        update = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in SUMS)
        out.append(
            f"INSERT INTO {table} ({', '.join(columns)}) "
            f"SELECT {bucket}, {key_sql}, {', '.join(CALL_SUMS)} FROM calls WHERE {where} "
            f"GROUP BY {groups}{order.format(groups)} "
            f"ON CONFLICT (bucket, {', '.join(keys)}) DO UPDATE SET {update}"
        )
    columns = ("agent", "intent", "first_seen", "last_seen", *INTENT_SUMS)
    update = ", ".join(f"{c} = intents.{c} + excluded.{c}" for c in INTENT_SUMS)
    out.append(
        f"INSERT INTO intents ({', '.join(columns)}) "
        f"SELECT agent, intent, MIN(started_at), MAX(started_at), {', '.join(_INTENT_VALUES)} "
        f"FROM calls WHERE ({where}) AND intent IS NOT NULL AND refused = 0 "
        f"GROUP BY agent, intent{order.format('agent, intent')} "
        f"ON CONFLICT (agent, intent) DO UPDATE SET"
        f" first_seen = {least}(intents.first_seen, excluded.first_seen),"
        f" last_seen = {greatest}(intents.last_seen, excluded.last_seen), {update}"
    )
    return out
