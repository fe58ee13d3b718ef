"""Named migrations, applied in order and recorded in `_migrations`; the same on every engine.

Each migration is a function of the dialect ("sqlite" or "postgresql") returning the SQL
statements to run. Never edit an applied migration: add a new one.
"""

from __future__ import annotations

from collections.abc import Callable

_CALL_COLUMNS = """
    id TEXT NOT NULL UNIQUE,
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
    # `seq` numbers rows in insertion order: rollups are kept up to a seq (see rollups.py).
    seq = (
        "seq INTEGER PRIMARY KEY AUTOINCREMENT"
        if dialect == "sqlite"
        else "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    )
    return [
        f"CREATE TABLE calls (\n    {seq},{_CALL_COLUMNS})",
        "CREATE INDEX calls_started ON calls (started_at)",
        "CREATE INDEX calls_intent ON calls (intent, started_at) WHERE intent IS NOT NULL",
    ]


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
    "cost_pico",
    "unpriced",
)


ROLLUPS = {
    # table: its key columns besides the bucket (wide one first: agent-filtered reports)
    "rollup_15m": ("agent", "model", "upstream"),
    # Narrow ones serve the unfiltered reports: a dozen times fewer rows to scan.
    "rollup_agent_15m": ("agent",),
    "rollup_model_15m": ("model",),
    "rollup_upstream_15m": ("upstream",),
}


def m002_rollups(dialect: str) -> list[str]:
    """15-minute rollups and per-intent lifetime totals of the call rows (see
    `proxy.storage.rollups` for who keeps them up to date, and when).

    15 minutes divides every time zone's offset, so reports and budget windows in any zone
    are exact unions of buckets.
    """
    sums = ",\n".join(f"    {c} BIGINT NOT NULL" for c in SUMS)
    tables = []
    for table, keys in ROLLUPS.items():
        key_columns = "".join(f"    {k} TEXT NOT NULL,\n" for k in keys)
        tables.append(
            f"CREATE TABLE {table} (\n    bucket BIGINT NOT NULL,\n{key_columns}{sums},\n"
            f"    PRIMARY KEY (bucket, {', '.join(keys)})\n)"
        )
    return [
        *tables,
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
        # How far (by calls.seq) the rollups and intent totals have counted the call rows.
        "CREATE TABLE rollup_progress (name TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
        "INSERT INTO rollup_progress (name, seq) VALUES ('calls', 0)",
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


def m004_shared_budgets(dialect: str) -> list[str]:
    """Budget state shared by replicas (PostgreSQL): counters per scope, kind and window,
    reservations leased to a replica (released if it dies), loop-guard hits, and alerts
    already sent. SQLite keeps this state in memory; the tables exist there unused, so both
    engines have one schema."""
    return [
        """CREATE TABLE budget_counters (
    scope TEXT NOT NULL,
    kind TEXT NOT NULL,
    window_start DOUBLE PRECISION NOT NULL,
    window_end DOUBLE PRECISION NOT NULL,
    used BIGINT NOT NULL,
    reserved BIGINT NOT NULL,
    PRIMARY KEY (scope, kind, window_start)
)""",
        "CREATE INDEX budget_counters_end ON budget_counters (window_end)",
        """CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    amount BIGINT NOT NULL,
    counters TEXT NOT NULL
)""",
        "CREATE INDEX reservations_replica ON reservations (replica)",
        "CREATE TABLE replicas (id TEXT PRIMARY KEY, last_seen DOUBLE PRECISION NOT NULL)",
        """CREATE TABLE loop_hits (
    agent TEXT NOT NULL,
    intent TEXT NOT NULL,
    digest TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
)""",
        "CREATE INDEX loop_hits_key ON loop_hits (agent, intent, digest, at)",
        "CREATE TABLE alerts_sent (key TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)",
    ]


MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_calls", m001_calls),
    ("002_rollups", m002_rollups),
    ("003_agent_state", m003_agent_state),
    ("004_shared_budgets", m004_shared_budgets),
]
