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


# m002's tables as they were created: frozen here, whatever the live schema is now.
_M002_SUMS = (
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
_M002_ROLLUPS = {
    "rollup_15m": ("agent", "model", "upstream"),
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
    sums = ",\n".join(f"    {c} BIGINT NOT NULL" for c in _M002_SUMS)
    tables = []
    for table, keys in _M002_ROLLUPS.items():
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


def _rebuild(table: str, create: str, select: str) -> list[str]:
    """A table rebuilt in a new shape: works on every SQLite (no DROP COLUMN needed)."""
    return [
        create.format(table=f"{table}_new"),
        f"INSERT INTO {table}_new {select}",
        f"DROP TABLE {table}",
        f"ALTER TABLE {table}_new RENAME TO {table}",
    ]


_M005_COUNTS = (
    "requests",
    "llm_calls",
    "refused",
    "errors",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
)


def m005_exact_sums(dialect: str) -> list[str]:
    """Money sums that cannot overflow. A row's cost fits 64 bits (see proxy.bounds); a sum
    of many may not (2^63 pico-USD is only $9.2M). Rollups and intent totals now keep cost
    as whole micro-USD plus the pico-USD remainder: both sum as plain integers, exactly,
    until $9.2 trillion. PostgreSQL's shared budget counters become NUMERIC (exact, no
    bound). Rows committed but not rolled up yet (an old overflow) are counted afterwards
    from the progress mark, in the new shape."""
    statements = []
    for table, keys in _M002_ROLLUPS.items():
        key_columns = "".join(f"    {k} TEXT NOT NULL,\n" for k in keys)
        counts = "".join(f"    {c} BIGINT NOT NULL,\n" for c in _M005_COUNTS)
        create = (
            "CREATE TABLE {table} (\n    bucket BIGINT NOT NULL,\n"
            f"{key_columns}{counts}"
            "    cost_micro BIGINT NOT NULL,\n    cost_pico_rem BIGINT NOT NULL,\n"
            f"    unpriced BIGINT NOT NULL,\n    PRIMARY KEY (bucket, {', '.join(keys)})\n)"
        )
        columns = ", ".join(("bucket", *keys, *_M005_COUNTS))
        select = (
            f"SELECT {columns}, cost_pico / 1000000, cost_pico % 1000000, unpriced FROM {table}"
        )
        statements += _rebuild(table, create, select)
    if dialect == "postgresql":
        statements += [
            "ALTER TABLE budget_counters ALTER COLUMN used TYPE NUMERIC",
            "ALTER TABLE budget_counters ALTER COLUMN reserved TYPE NUMERIC",
            "ALTER TABLE reservations ALTER COLUMN amount TYPE NUMERIC",
        ]
    return statements


def m006_intents_per_agent(dialect: str) -> list[str]:
    """Intents in their agent's lane: keyed by (agent, intent), so no agent can spend,
    exhaust or pause another's intent by using its id. Exact cost sums as in m005. And the
    quarantine: rows the ledger could not store, kept whole (as JSON) for inspection."""
    create = """CREATE TABLE {table} (
    agent TEXT NOT NULL,
    intent TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL,
    requests BIGINT NOT NULL,
    llm_calls BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cost_micro BIGINT NOT NULL,
    cost_pico_rem BIGINT NOT NULL,
    unpriced BIGINT NOT NULL,
    PRIMARY KEY (agent, intent)
)"""
    select = (
        "SELECT agent, intent, first_seen, last_seen, requests, llm_calls, input_tokens,"
        " output_tokens, cost_pico / 1000000, cost_pico % 1000000, unpriced FROM intents"
    )
    return [
        "DROP INDEX intents_agent_first",
        *_rebuild("intents", create, select),
        "CREATE INDEX intents_agent_first ON intents (agent, first_seen)",
        # An intent's calls in one agent's lane; also serves per-agent lookups of the ledger.
        "CREATE INDEX calls_agent_started ON calls (agent, started_at)",
        """CREATE TABLE quarantine (
    id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    error TEXT NOT NULL,
    row_json TEXT NOT NULL
)""",
    ]


def m007_call_dimensions(dialect: str) -> list[str]:
    """What the calls of native provider APIs, end users and dry-run budgets need: the
    provider, the agent's end user, free-form tags, the provider's response id (chains
    and background responses) and the dry-run limit that would have refused a call."""
    columns = ("provider", "end_user", "tags", "response_id", "shadow_limit")
    return [
        *(f"ALTER TABLE calls ADD COLUMN {c} TEXT" for c in columns),
        "CREATE INDEX calls_response ON calls (response_id) WHERE response_id IS NOT NULL",
        "CREATE INDEX calls_user ON calls (agent, end_user, started_at) WHERE end_user IS NOT NULL",
    ]


def m008_runaways(dialect: str) -> list[str]:
    """What runaway detection needs: rollups count dry-run refusals (so a report shows what
    a shadow budget would have stopped), and intents get their outcome and the spend at
    their last progress report. A table of its own: an outcome can arrive before the
    rollups have seen the intent's first call."""
    rollups = ("rollup_15m", "rollup_agent_15m", "rollup_model_15m", "rollup_upstream_15m")
    return [
        *(f"ALTER TABLE {t} ADD COLUMN shadowed BIGINT NOT NULL DEFAULT 0" for t in rollups),
        """CREATE TABLE intent_outcomes (
    agent TEXT NOT NULL,
    intent TEXT NOT NULL,
    outcome TEXT,
    outcome_at DOUBLE PRECISION,
    source TEXT,
    progress_at DOUBLE PRECISION,
    progress_spent_pico BIGINT,
    PRIMARY KEY (agent, intent)
)""",
    ]


MIGRATIONS: list[tuple[str, Callable[[str], list[str]]]] = [
    ("001_calls", m001_calls),
    ("002_rollups", m002_rollups),
    ("003_agent_state", m003_agent_state),
    ("004_shared_budgets", m004_shared_budgets),
    ("005_exact_sums", m005_exact_sums),
    ("006_intents_per_agent", m006_intents_per_agent),
    ("007_call_dimensions", m007_call_dimensions),
    ("008_runaways", m008_runaways),
]
