"""Named migrations, applied in order and recorded in `_migrations`; the same on every engine.

Each migration is a function of the dialect ("sqlite" or "postgresql") returning the SQL
statements to run. Never edit an applied migration: add a new one.
"""

from __future__ import annotations

from collections.abc import Callable

_CALL_COLUMNS = """
    id TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION NOT NULL,
    agent TEXT NOT NULL,
    intent TEXT,
    upstream TEXT,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    model_requested TEXT,
    model_served TEXT,
    model_priced TEXT,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_pico BIGINT,
    usage_source TEXT NOT NULL,
    service_tier TEXT,
    price_version TEXT,
    latency_ms DOUBLE PRECISION NOT NULL,
    ttfb_ms DOUBLE PRECISION,
    error TEXT,
    llm_calls INTEGER NOT NULL,
    refused INTEGER NOT NULL,
    reserved_pico BIGINT NOT NULL
"""


def m001_calls(dialect: str) -> list[str]:
    return [
        f"CREATE TABLE calls ({_CALL_COLUMNS})",
        "CREATE INDEX calls_started ON calls (started_at)",
        "CREATE INDEX calls_agent_started ON calls (agent, started_at)",
        "CREATE INDEX calls_intent ON calls (intent, started_at) WHERE intent IS NOT NULL",
    ]


_SUMS = (
    "requests",
    "llm_calls",
    "refused",
    "errors",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "cost_pico",
    "unpriced",
)


def m002_rollups(dialect: str) -> list[str]:
    """15-minute rollups and per-intent lifetime totals, kept by a trigger on `calls`.

    A trigger (not the writer) keeps them, so a row inserted twice by a replay
    (ON CONFLICT DO NOTHING) is never counted twice. 15 minutes divides every time zone's
    offset, so reports and budget windows in any zone are exact unions of buckets.
    """
    sums = ",\n".join(f"    {c} BIGINT NOT NULL" for c in _SUMS)
    tables = [
        f"""CREATE TABLE rollup_15m (
    bucket BIGINT NOT NULL,
    agent TEXT NOT NULL,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
{sums},
    PRIMARY KEY (bucket, agent, model, upstream)
)""",
        """CREATE TABLE intents (
    intent TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    requests BIGINT NOT NULL,
    llm_calls BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_pico BIGINT NOT NULL,
    unpriced BIGINT NOT NULL
)""",
        "CREATE INDEX intents_agent_first ON intents (agent, first_seen)",
    ]
    if dialect == "sqlite":
        bucket = "CAST(NEW.started_at / 900 AS INTEGER) * 900"
        as_int = "({})"
        least, greatest = "min", "max"
    else:
        bucket = "CAST(floor(NEW.started_at / 900) AS BIGINT) * 900"
        as_int = "CAST(({}) AS INTEGER)"
        least, greatest = "LEAST", "GREATEST"
    unpriced = as_int.format("NEW.cost_pico IS NULL AND NEW.llm_calls > 0")
    rollup_values = ", ".join(
        [
            bucket,
            "NEW.agent",
            "COALESCE(NEW.model_requested, NEW.model_served, '')",
            "COALESCE(NEW.upstream, '')",
            "1",
            "NEW.llm_calls",
            "NEW.refused",
            as_int.format("NEW.status >= 400"),
            "NEW.input_tokens",
            "NEW.cached_input_tokens",
            "NEW.output_tokens",
            "NEW.reasoning_tokens",
            "NEW.cache_write_tokens",
            "COALESCE(NEW.cost_pico, 0)",
            unpriced,
        ]
    )
    rollup_update = ", ".join(f"{c} = rollup_15m.{c} + excluded.{c}" for c in _SUMS)
    intent_sums = (
        "requests",
        "llm_calls",
        "input_tokens",
        "output_tokens",
        "cost_pico",
        "unpriced",
    )
    intent_update = ", ".join(f"{c} = intents.{c} + excluded.{c}" for c in intent_sums)
    body = f"""
    INSERT INTO rollup_15m (bucket, agent, model, upstream, {", ".join(_SUMS)})
    VALUES ({rollup_values})
    ON CONFLICT (bucket, agent, model, upstream) DO UPDATE SET {rollup_update};
    INSERT INTO intents (intent, agent, first_seen, last_seen, {", ".join(intent_sums)})
    SELECT NEW.intent, NEW.agent, NEW.started_at, NEW.started_at, 1, NEW.llm_calls,
           NEW.input_tokens, NEW.output_tokens, COALESCE(NEW.cost_pico, 0), {unpriced}
    WHERE NEW.intent IS NOT NULL AND NEW.refused = 0
    ON CONFLICT (intent) DO UPDATE SET
        first_seen = {least}(intents.first_seen, excluded.first_seen),
        last_seen = {greatest}(intents.last_seen, excluded.last_seen),
        {intent_update};"""
    if dialect == "sqlite":
        return [*tables, f"CREATE TRIGGER calls_rollup AFTER INSERT ON calls BEGIN{body}\nEND"]
    return [
        *tables,
        f"""CREATE FUNCTION meterproxy_calls_rollup() RETURNS trigger AS $$
BEGIN{body}
    RETURN NULL;
END $$ LANGUAGE plpgsql""",
        """CREATE TRIGGER calls_rollup AFTER INSERT ON calls
    FOR EACH ROW EXECUTE FUNCTION meterproxy_calls_rollup()""",
    ]


def m003_agent_state(dialect: str) -> list[str]:
    return [
        """CREATE TABLE policies (
    agent TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
)""",
        """CREATE TABLE agent_state (
    agent TEXT PRIMARY KEY,
    paused INTEGER NOT NULL,
    reason TEXT,
    updated_at DOUBLE PRECISION NOT NULL
)""",
    ]


MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_calls", m001_calls),
    ("002_rollups", m002_rollups),
    ("003_agent_state", m003_agent_state),
]
