"""Code that runs inside PostgreSQL: the two functions a replica installs at each start.

`meterproxy_admit` checks and reserves a batch of admissions; `meterproxy_record` writes a
batch of ledger rows with their rollups, budget spend and reservation releases. Each is
one round trip and holds row locks only for its own length. They are code, not schema:
every start replaces them (`CREATE OR REPLACE`), so run one meterproxy version across
replicas.
"""

from __future__ import annotations

from proxy.storage.base import CALL_COLUMNS
from proxy.storage.rollups import rollup_statements

PG_TYPES = {
    "id": "text", "started_at": "float8", "ended_at": "float8", "agent": "text",
    "intent": "text", "upstream": "text", "endpoint": "text", "method": "text",
    "model_requested": "text", "model_served": "text", "model_priced": "text",
    "status": "int4", "stream": "int4", "input_tokens": "int8", "cached_input_tokens": "int8",
    "output_tokens": "int8", "reasoning_tokens": "int8", "cache_write_tokens": "int8",
    "cost_pico": "int8", "usage_source": "text", "service_tier": "text",
    "price_version": "text", "latency_ms": "float8", "ttfb_ms": "float8", "error": "text",
    "llm_calls": "int4", "refused": "int4", "reserved_pico": "int8",
    "provider": "text", "end_user": "text", "tags": "text", "response_id": "text",
    "shadow_limit": "text",
}  # fmt: skip
assert set(PG_TYPES) == set(CALL_COLUMNS)
RECORD_CALL = (
    "SELECT meterproxy_record("
    + ", ".join(f"${i}::{PG_TYPES[c]}[]" for i, c in enumerate(CALL_COLUMNS, 1))
    + ", "
    + ", ".join(
        f"${i}::{t}[]"
        for i, t in enumerate(
            ("text", "text", "text", "float8", "float8", "int8"), len(CALL_COLUMNS) + 1
        )
    )
    + ")"
)

# Admission: concurrent admissions of one process go to the database together (like the
# ledger's group commit), one round trip for all of them, and each counter's row lock is
# held for the length of this function only. The caller (shared enforcer) turns its
# policies into, per counter: what the call adds to used and to reserved, and the most
# used + reserved may be before it (cap; NULL: not checked); `new_only` rows count a new
# intent and apply only when this admission created the intent's lifetime counter. Each
# admission is all or nothing, in order: when any of its caps is exceeded, or its agent is
# paused, or its loop guard trips, nothing of it is added. For each admission, one outcome
# row (scope NULL), then its counters as they are after it.
# Both functions use generic plans: with array parameters PostgreSQL would otherwise plan
# every statement again on every call (custom plans look cheaper for short arrays), which
# costs more than running them.
ADMIT_FUNCTION = """
CREATE OR REPLACE FUNCTION meterproxy_admit(
    p_replica text, a_now float8[],
    a_agent text[], a_lease text[], a_amount numeric[], a_lease_keys text[], a_intent text[],
    a_loop_intent text[], a_loop_digest text[], a_loop_since float8[], a_loop_max int[],
    c_adm int[], c_scope text[], c_kind text[], c_start float8[], c_end float8[],
    c_du numeric[], c_dr numeric[], c_cap numeric[], c_new_only boolean[]
) RETURNS TABLE (o_adm int, o_ok boolean, o_fresh boolean, o_paused boolean, o_reason text,
                 o_seen int, o_scope text, o_kind text, o_start float8, o_used numeric,
                 o_reserved numeric)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    v_created text[];
    v_users text[];
    v_ok boolean;
    v_fresh boolean;
    v_paused boolean;
    v_reason text;
    v_seen int;
    v_intent_scope text;
    v_has_key boolean;
BEGIN
    WITH created AS (
        INSERT INTO budget_counters AS b (scope, kind, window_start, window_end, used, reserved)
        SELECT DISTINCT r.s, r.k, r.w, r.e, 0::numeric, 0::numeric
        FROM unnest(c_scope, c_kind, c_start, c_end) AS r(s, k, w, e) ORDER BY 1, 2, 3
        ON CONFLICT DO NOTHING RETURNING b.scope, b.kind, b.window_start)
    SELECT array_agg(c.scope) FILTER (WHERE c.scope LIKE 'intent:%'),
           array_agg(c.scope || chr(30) || c.kind || chr(30) || c.window_start::text)
               FILTER (WHERE c.scope LIKE 'user:%' AND c.kind LIKE 'cost:%')
        INTO v_created, v_users FROM created c;
    IF v_users IS NOT NULL THEN  -- an end user's counters start from what the ledger holds
        UPDATE budget_counters b SET used = COALESCE(
            (SELECT SUM(k.cost_pico) FROM calls k
             WHERE k.agent = split_part(substr(b.scope, 6), chr(31), 1)
               AND k.end_user = split_part(substr(b.scope, 6), chr(31), 2)
               AND k.started_at >= b.window_start AND k.started_at < b.window_end), 0)
        WHERE b.scope || chr(30) || b.kind || chr(30) || b.window_start::text = ANY(v_users);
    END IF;
    IF v_created IS NOT NULL THEN  -- older calls of an intent may be in the ledger
        UPDATE budget_counters b SET used = COALESCE(
            (SELECT i.cost_micro * 1000000::numeric + i.cost_pico_rem FROM intents i
             WHERE i.agent = split_part(substr(b.scope, 8), chr(31), 1)
               AND i.intent = split_part(substr(b.scope, 8), chr(31), 2)), 0)
        WHERE b.kind = 'cost:life' AND b.scope = ANY(v_created);
    END IF;
    PERFORM 1 FROM budget_counters b
        JOIN (SELECT DISTINCT r.s, r.k, r.w FROM unnest(c_scope, c_kind, c_start) AS r(s, k, w)) r
        ON b.scope = r.s AND b.kind = r.k AND b.window_start = r.w
        ORDER BY b.scope, b.kind, b.window_start FOR UPDATE OF b;
    -- Loop-guard keys too, all at once and in order: two batches cannot deadlock on them.
    PERFORM pg_advisory_xact_lock(h) FROM (
        SELECT DISTINCT hashtextextended(g || chr(31) || li || chr(31) || d, 0) AS h
        FROM unnest(a_agent, a_loop_intent, a_loop_digest) AS x(g, li, d)
        WHERE d IS NOT NULL ORDER BY 1) locks;
    FOR i IN 1 .. COALESCE(array_length(a_agent, 1), 0) LOOP
        v_ok := true;
        v_seen := 0;
        v_reason := NULL;
        v_paused := NULL;
        v_intent_scope := 'intent:' || a_agent[i] || chr(31) || a_intent[i];
        v_has_key := EXISTS (SELECT 1 FROM unnest(c_adm, c_scope) AS r(a, s)
                             WHERE r.a = i AND r.s = v_intent_scope);
        -- A new intent: its counter was created by this batch and no admission of it has
        -- gone through yet (a refused one does not start it), and the ledger never saw it.
        v_fresh := COALESCE(v_has_key AND v_intent_scope = ANY(v_created) AND NOT EXISTS (
            SELECT 1 FROM intents it WHERE it.agent = a_agent[i] AND it.intent = a_intent[i]),
            false);
        SELECT true, st.reason INTO v_paused, v_reason FROM agent_state st
            WHERE st.agent = a_agent[i] AND st.paused = 1;
        v_paused := COALESCE(v_paused, false);
        IF a_loop_digest[i] IS NOT NULL THEN
            SELECT count(*) INTO v_seen FROM loop_hits h WHERE h.agent = a_agent[i]
                AND h.intent = a_loop_intent[i] AND h.digest = a_loop_digest[i]
                AND h.at > a_loop_since[i];
            INSERT INTO loop_hits (agent, intent, digest, at)
                VALUES (a_agent[i], a_loop_intent[i], a_loop_digest[i], a_now[i]);
            IF a_loop_max[i] IS NOT NULL AND v_seen >= a_loop_max[i] THEN
                v_ok := false;
            END IF;
        END IF;
        IF v_paused THEN
            v_ok := false;
        END IF;
        IF v_ok THEN
            SELECT COALESCE(bool_and(b.used + b.reserved <= r.c), true) INTO v_ok
            FROM budget_counters b
            JOIN unnest(c_adm, c_scope, c_kind, c_start, c_cap, c_new_only) AS r(a, s, k, w, c, n)
                ON b.scope = r.s AND b.kind = r.k AND b.window_start = r.w
            WHERE r.a = i AND r.c IS NOT NULL AND (NOT r.n OR v_fresh);
        END IF;
        IF v_ok THEN
            UPDATE budget_counters b SET used = b.used + r.du, reserved = b.reserved + r.dr
            FROM unnest(c_adm, c_scope, c_kind, c_start, c_du, c_dr, c_new_only)
                AS r(a, s, k, w, du, dr, n)
            WHERE r.a = i AND b.scope = r.s AND b.kind = r.k AND b.window_start = r.w
                AND (NOT r.n OR v_fresh) AND (r.du <> 0 OR r.dr <> 0);
            IF a_lease[i] IS NOT NULL THEN
                -- A lease seen again is a stream extending its reservation: more of it.
                INSERT INTO reservations AS rv (id, replica, created, amount, counters)
                    VALUES (a_lease[i], p_replica, a_now[i], a_amount[i], a_lease_keys[i])
                    ON CONFLICT (id) DO UPDATE SET amount = rv.amount + excluded.amount;
            END IF;
            IF v_has_key THEN
                v_created := array_remove(v_created, v_intent_scope);
            END IF;
        END IF;
        RETURN QUERY SELECT i, v_ok, v_fresh, v_paused, v_reason, v_seen,
            NULL::text, NULL::text, NULL::float8, NULL::numeric, NULL::numeric;
        RETURN QUERY SELECT i, v_ok, v_fresh, v_paused, v_reason, v_seen,
            b.scope, b.kind, b.window_start, b.used, b.reserved
        FROM budget_counters b JOIN unnest(c_adm, c_scope, c_kind, c_start) AS r(a, s, k, w)
            ON b.scope = r.s AND b.kind = r.k AND b.window_start = r.w
        WHERE r.a = i;
    END LOOP;
    -- Counters of intents no admission started: gone, so the next call is new again.
    IF cardinality(v_created) > 0 THEN
        DELETE FROM budget_counters b WHERE b.kind = 'cost:life' AND b.scope = ANY(v_created);
    END IF;
END
$fn$
"""
ADMIT_CALL = "SELECT * FROM meterproxy_admit(" + ", ".join(f"${i}" for i in range(1, 21)) + ")"


def record_function() -> str:
    """The ledger write in one round trip: rows inserted (an id already stored is skipped),
    added to the rollups and intent totals, their costs added to every budget counter of
    their windows and their reservations released - all for the rows really inserted, so a
    replayed row changes nothing. Generated from the same rollup SQL as SQLite's."""
    columns = ", ".join(CALL_COLUMNS)
    params = ", ".join(f"p_{c} {PG_TYPES[c]}[]" for c in CALL_COLUMNS)
    arrays = ", ".join(f"p_{c}" for c in CALL_COLUMNS)
    rollups = ";\n    ".join(rollup_statements("postgresql", "seq = ANY(v_seqs)"))
    return f"""
CREATE OR REPLACE FUNCTION meterproxy_record({params},
    p_spend_id text[], p_scope text[], p_kind text[], p_start float8[], p_end float8[],
    p_cost int8[]) RETURNS int LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    v_seqs bigint[];
    v_ids text[];
BEGIN
    WITH ins AS (
        INSERT INTO calls ({columns}) SELECT * FROM unnest({arrays})
        ON CONFLICT (id) DO NOTHING RETURNING seq, id)
    SELECT array_agg(ins.seq), array_agg(ins.id) INTO v_seqs, v_ids FROM ins;
    IF v_seqs IS NULL THEN
        RETURN 0;
    END IF;
    {rollups};
    WITH gone AS (
        DELETE FROM reservations r WHERE r.id = ANY(v_ids) RETURNING r.amount, r.counters),
    deltas AS (
        SELECT t.s, t.k, t.w, t.e, t.c::numeric AS du, 0::numeric AS dr
        FROM unnest(p_spend_id, p_scope, p_kind, p_start, p_end, p_cost) AS t(i, s, k, w, e, c)
        WHERE t.i = ANY(v_ids)
        UNION ALL
        SELECT j->>0, j->>1, (j->>2)::float8, (j->>3)::float8, 0::numeric, -g.amount
        FROM gone g, json_array_elements(g.counters::json) AS j)
    INSERT INTO budget_counters AS b (scope, kind, window_start, window_end, used, reserved)
    SELECT d.s, d.k, d.w, max(d.e), sum(d.du), sum(d.dr) FROM deltas d
    GROUP BY d.s, d.k, d.w ORDER BY d.s, d.k, d.w
    ON CONFLICT (scope, kind, window_start) DO UPDATE
    SET used = b.used + excluded.used, reserved = b.reserved + excluded.reserved;
    RETURN array_length(v_seqs, 1);
END
$fn$
"""
