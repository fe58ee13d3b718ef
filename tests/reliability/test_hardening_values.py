"""Hardening, items 1, 2 and 5 of the issue: no number can wedge the ledger or break a
restart, the writer cannot be poisoned, and heartbeats and intents stay in their lane."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from proxy.config_file import parse_config
from proxy.storage.migrations import MIGRATIONS
from tests.conftest import ROOT, Proxy, ProxyFactory
from tests.reliability.proc import ADMIN, ProxyProcess

HI = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {ADMIN}"}


async def _chat(session: aiohttp.ClientSession, url: str, **headers: str) -> int:
    body = {"model": "gpt-4o", "messages": HI, "max_tokens": 5}
    async with session.post(url + "/v1/chat/completions", headers=headers, json=body) as r:
        await r.read()
        return r.status


# -- item 1: one heartbeat wedged every call ------------------------------------------------


async def test_a_huge_heartbeat_is_refused_and_the_proxy_keeps_serving(
    fake: Any, tmp_path: Path
) -> None:
    _, fake_url = fake
    proxy = ProxyProcess(tmp_path, fake_url)
    await proxy.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            bodies = [
                json.dumps({"agent": "x", "metrics": {"cost_usd": 10_000_000}}),
                '{"agent": "x", "metrics": {"cost_usd": 1e309}}',  # raw: infinite
                json.dumps({"agent": "x", "metrics": {"cost_usd": 0.01, "tokens_in": 1e19}}),
                json.dumps({"agent": "x", "metrics": {"cost_usd": 0.01, "tokens_in": 10**19}}),
            ]
            answers = []
            for body in bodies:
                async with s.post(proxy.url + "/meter/heartbeat", data=body,
                                  headers={"Content-Type": "application/json"}) as r:  # fmt: skip
                    answers.append((r.status, (await r.json())["error"]))
            assert [status for status, _ in answers] == [400, 400, 400, 400]
            assert answers[0][1]["param"] == "metrics.cost_usd"
            assert "at most 100 per heartbeat (heartbeat.max_cost_usd)" in answers[0][1]["message"]
            assert answers[1][1]["code"] == "invalid_json"
            assert "must be a whole number" in answers[2][1]["message"]
            assert "must be <= 100000000" in answers[3][1]["message"]
            # Every other call is still answered, and committed.
            assert await _chat(s, proxy.url) == 200
            async with s.get(proxy.url + "/v1/models") as r:
                assert r.status == 200
            async with s.get(proxy.url + "/meter/health") as r:
                assert (await r.json())["status"] == "ok"
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait(30) == 0
        assert time.monotonic() - started < 10
    finally:
        if proxy.proc is not None and proxy.proc.returncode is None:
            proxy.proc.kill()
    rows = proxy.rows()
    assert [(r["endpoint"], r["status"]) for r in rows] == [("chat/completions", 200),
                                                           ("models", 200)]  # fmt: skip


async def test_an_upstream_usage_too_big_is_estimated_and_named(
    make_proxy: ProxyFactory, fake: Any, db_url: str
) -> None:
    """`prompt_tokens: 1e15` from the upstream wedged the writer too (on PostgreSQL:
    DataError out of int64 range). Now it is invalid usage: estimated, the field named."""
    upstream, _ = fake
    proxy = await make_proxy(db_url=db_url)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0)
    upstream.script.update(usage={"prompt_tokens": 10**15, "completion_tokens": 5})
    await client.chat.completions.create(model="gpt-4o", messages=HI)
    upstream.script.update(usage=None)
    await client.chat.completions.create(model="gpt-4o", messages=HI)
    rows = await proxy.rows()
    assert [r["usage_source"] for r in rows] == ["estimated", "provider"]
    assert rows[0]["error"] == (
        "invalid provider usage: prompt_tokens=1000000000000000 is more than 100,000,000 tokens"
    )
    assert rows[1]["cost_pico"] == 80_000_000


# -- a writer that cannot be poisoned ---------------------------------------------------------


async def _poison(proxy: Proxy) -> None:
    """A database that refuses one row for good (as a column that cannot hold a value)."""
    storage = proxy.svc.storage
    if storage.dialect == "sqlite":
        await storage.run_script([
            "CREATE TRIGGER poison BEFORE INSERT ON calls WHEN NEW.intent = 'poison'"
            " BEGIN SELECT RAISE(ABORT, 'this row cannot be stored'); END"
        ])  # fmt: skip
    else:
        await storage.run_script([
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.intent = 'poison' THEN RAISE EXCEPTION 'this row cannot be stored'"
            " USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON calls FOR EACH ROW EXECUTE FUNCTION poison()",
        ])  # fmt: skip


async def test_a_row_the_database_refuses_is_quarantined_and_the_rest_committed(
    make_proxy: ProxyFactory, fake: Any, db_url: str, caplog: Any
) -> None:
    upstream, _ = fake
    proxy = await make_proxy(db_url=db_url)
    await _poison(proxy)
    upstream.script.update(delay=0.05)  # they arrive together: one batch
    async with aiohttp.ClientSession() as s:
        statuses = await asyncio.gather(*(
            _chat(s, proxy.url, **{"X-Intent-Id": "poison" if i == 3 else f"t{i}"})
            for i in range(10)
        ))  # fmt: skip
        assert statuses == [200] * 10  # the poisoned call's client is answered too
        rows = await proxy.rows()
        assert sorted(r["intent"] for r in rows) == sorted(f"t{i}" for i in range(10) if i != 3)
        quarantined = await proxy.svc.storage.quarantined()
        assert len(quarantined) == 1 and "this row cannot be stored" in quarantined[0]["error"]
        assert quarantined[0]["row"][4] == "poison"  # the whole row, kept for repair
        async with s.get(proxy.url + "/metrics") as r:
            assert "meterproxy_ledger_quarantined_rows_total 1.0" in await r.text()
    errors = [r.getMessage() for r in caplog.records if r.name == "meterproxy.ledger"
              and r.levelname == "ERROR"]  # fmt: skip
    assert len(errors) == 1 and quarantined[0]["id"] in errors[0]


async def test_a_row_no_column_holds_is_quarantined_before_it_joins_a_batch(
    proxy: Proxy,
) -> None:
    from tests.records import call_record

    ledger = proxy.svc.ledger
    bad = call_record("req_bad", 1.0, cost_pico=2**63)  # past every bound: a bug upstream of us
    good = call_record("req_good", 1.0)
    await asyncio.gather(ledger.commit(bad), ledger.commit(good))
    assert [r["id"] for r in await proxy.rows()] == ["req_good"]
    (q,) = await proxy.svc.storage.quarantined()
    assert q["id"] == "req_bad" and q["row"][18] == 2**63 and "cost_pico" in q["error"]


async def test_a_writer_that_cannot_commit_says_so_and_calls_are_still_answered(
    make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    proxy = await make_proxy(commit_timeout=0.3, stall_seconds=0.5)
    path = proxy.config.db_url.removeprefix("sqlite:///")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # another process holding the database
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(30)
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    try:
        async with aiohttp.ClientSession() as s:
            assert [await _chat(s, proxy.url) for _ in range(3)] == [200] * 3
            await asyncio.sleep(0.6)
            async with s.get(proxy.url + "/meter/health") as r:
                health = await r.json()
            assert health["status"] == "degraded" and health["ledger"] == "stalled"
            assert health["ledger_backlog"] == 3
            async with s.get(proxy.url + "/metrics") as r:
                assert "meterproxy_ledger_stalled 1.0" in await r.text()
            release.set()
            holder.join(10)
            await proxy.flushed()
            async with s.get(proxy.url + "/meter/health") as r:
                assert (await r.json())["status"] == "ok"
        assert len(await proxy.rows()) == 3
    finally:
        release.set()
        holder.join(10)


async def test_once_a_commit_is_late_calls_stop_waiting_until_the_ledger_catches_up(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy(commit_timeout=1.0)
    path = proxy.config.db_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process holding the database
    ledger = proxy.svc.ledger

    async def timed(s: aiohttp.ClientSession) -> tuple[int, float]:
        started = time.monotonic()
        status = await _chat(s, proxy.url)
        return status, time.monotonic() - started

    try:
        async with aiohttp.ClientSession() as s:
            answers = [await timed(s) for _ in range(4)]
            assert [status for status, _ in answers] == [200] * 4
            assert answers[0][1] >= 1.0  # the first call waited the whole bound
            assert all(seconds < 0.5 for _, seconds in answers[1:])  # the rest did not
            assert ledger.late and ledger.unconfirmed == 4 and ledger.backlog == 4
            async with s.get(proxy.url + "/metrics") as r:
                assert "meterproxy_ledger_unconfirmed_answers_total 4.0" in await r.text()
            holder.execute("ROLLBACK")
            await proxy.flushed()
            assert not ledger.late  # caught up: the next call waits for its row again
            assert await _chat(s, proxy.url) == 200
            assert ledger.unconfirmed == 4
        assert len(await proxy.rows()) == 5
    finally:
        holder.close()


async def test_a_lone_calls_answer_goes_out_while_its_row_commits_but_not_its_last_byte(
    make_proxy: ProxyFactory,
) -> None:
    """Alone on the proxy, a call's answer is written while its row commits, all but the
    last byte: a client cannot finish reading the answer of a call with no row."""
    proxy = await make_proxy()
    path = proxy.config.db_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # the row's commit waits for this
    body = json.dumps({"model": "gpt-4o", "messages": HI, "max_tokens": 5}).encode()
    assert proxy.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type:"
                     b" application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (proxy.server.port, len(body), body))  # fmt: skip
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().lower()
        headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if line)
        assert head.startswith("http/1.1 200")
        first = await asyncio.wait_for(reader.readexactly(int(headers["content-length"]) - 1), 10)
        with pytest.raises(TimeoutError):  # the last byte waits for the row
            await asyncio.wait_for(reader.readexactly(1), 0.5)
        assert proxy.svc.ledger.backlog == 1
        holder.execute("ROLLBACK")
        last = await asyncio.wait_for(reader.readexactly(1), 10)
    finally:
        holder.close()
        writer.close()
    answer = json.loads(first + last)
    rows = await proxy.rows()
    assert [r["id"] for r in rows] == [headers["x-meter-request-id"]]
    assert rows[0]["output_tokens"] == answer["usage"]["completion_tokens"]


async def test_a_client_that_hangs_up_while_its_row_commits_still_gets_its_line_and_metrics(
    make_proxy: ProxyFactory,
) -> None:
    proxy = await make_proxy()
    path = proxy.config.db_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        async with aiohttp.ClientSession() as s:
            body = {"model": "gpt-4o", "messages": HI, "max_tokens": 5}
            async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200  # the head came; the body's last byte has not
            # leaving the block without reading the body closes the connection
        await asyncio.sleep(0.2)
        holder.execute("ROLLBACK")
        rows = await proxy.rows()
        assert len(rows) == 1 and rows[0]["status"] == 200
        await asyncio.sleep(0.05)  # the observers run on the turn after the commit
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
            text = await r.text()
        assert (
            'meterproxy_requests_total{agent="anonymous",model="gpt-4o",status="200"} 1.0' in text
        )
    finally:
        holder.close()


async def test_sigterm_exits_within_grace_and_saves_what_it_could_not_write(
    fake: Any, tmp_path: Path
) -> None:
    _, fake_url = fake
    proxy = ProxyProcess(tmp_path, fake_url, shutdown_grace_seconds=2,
                         extra={"storage": {"commit_timeout_seconds": 0.3}})  # fmt: skip
    await proxy.start()
    conn = sqlite3.connect(proxy.db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        async with aiohttp.ClientSession() as s:
            assert [await _chat(s, proxy.url) for _ in range(3)] == [200] * 3
        started = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait(20) == 0
        assert time.monotonic() - started < 6  # the grace (2 s) and closing, not 30 s
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert "3 rows could not be written before shutdown" in proxy.log
    saved = [
        json.loads(line) for line in (proxy.spool / "quarantine.jsonl").read_text().splitlines()
    ]
    assert len(saved) == 3 and {s["error"] for s in saved} == {"not written before shutdown"}


# -- item 2: two heartbeats broke the install ------------------------------------------------


def _old_ledger(path: Path, costs: list[int]) -> None:
    """A ledger as the previous release left it: migrations 001-004, rows committed but
    not rolled up, their sum past 2^63 pico-USD ($9.2M)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION)")
    for name, migration in MIGRATIONS[:4]:
        for statement in migration("sqlite"):
            conn.execute(statement)
        conn.execute("INSERT INTO _migrations VALUES (?, 0)", (name,))
    columns = 28
    for i, cost in enumerate(costs):
        row = [f"req_old{i}", time.time() - 60, time.time() - 60, "big-spender", "task", None,
               "heartbeat", "POST", None, None, None, 200, 0, 0, 0, 0, 0, 0, cost, "reported",
               None, None, 1.0, None, None, 1, 0, 0]  # fmt: skip
        assert len(row) == columns
        conn.execute(f"INSERT INTO calls (id, started_at, ended_at, agent, intent, upstream,"
                     f" endpoint, method, model_requested, model_served, model_priced, status,"
                     f" stream, input_tokens, cached_input_tokens, output_tokens,"
                     f" reasoning_tokens, cache_write_tokens, cost_pico, usage_source,"
                     f" service_tier, price_version, latency_ms, ttfb_ms, error, llm_calls,"
                     f" refused, reserved_pico) VALUES ({', '.join('?' * columns)})", row)  # fmt: skip
    conn.close()


async def test_a_ledger_past_9_2m_restarts_and_reports_exactly(fake: Any, tmp_path: Path) -> None:
    _, fake_url = fake
    # $5M twice, and one pico-dollar: the old roll-up overflowed on the sum.
    _old_ledger(tmp_path / "ledger.db", [5 * 10**18, 5 * 10**18, 1])
    proxy = ProxyProcess(tmp_path, fake_url)
    await proxy.start()  # migrates and rolls up; before: exit 1, integer overflow
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/meter/spend?by=agent", headers=AUTH) as r:
                assert r.status == 200
                report = await r.json()
            async with s.get(proxy.url + "/meter/agents/big-spender/intents/task",
                             headers=AUTH) as r:  # fmt: skip
                assert (await r.json())["spent_usd"] == "10000000.000000000001"
        assert report["total"]["cost_usd"] == "10000000.000000000001"
        assert [row["cost_usd"] for row in report["rows"]] == ["10000000.000000000001"]
    finally:
        proxy.signal(signal.SIGTERM)
        await proxy.wait()
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "proxy", "report", "--config", str(proxy.config), "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["total"]["cost_usd"] == "10000000.000000000001"


async def test_reports_stay_exact_past_int64_on_both_engines(storage: Any) -> None:
    """A big organisation's month: the sum of row costs far past 2^63 pico-USD."""
    from proxy.reports import spend_report
    from proxy.windows import Calendar
    from tests.records import call_record

    costs = [4 * 10**18 + 7] * 5 + [1]  # $20M and 36 pico-dollars
    rows = [call_record(f"req_{i}", 1_795_000_000.0 + i, agent="org", cost_pico=c)
            for i, c in enumerate(costs)]  # fmt: skip
    await storage.write_calls(rows)
    report = await spend_report(storage, Calendar("UTC"), by="agent")
    assert report.total.cost_pico == sum(costs) == 20_000_000_000_000_000_036
    assert report.to_json()["total"]["cost_usd"] == "20000000.000000000036"
    by_day = await spend_report(storage, Calendar("UTC"), by="model", window="day")
    assert sum(r.totals.cost_pico for r in by_day.rows) == by_day.total.cost_pico == sum(costs)


# -- item 5: heartbeats and intents cross agents ---------------------------------------------


async def test_a_heartbeat_cannot_exhaust_the_global_limit(make_proxy: ProxyFactory) -> None:
    text = "budgets:\n  global: {max_cost_per_day_usd: 200}\n"
    proxy = await make_proxy(policies=parse_config(yaml.safe_load(text)).policies,
                             admin_token=ADMIN)  # fmt: skip
    async with aiohttp.ClientSession() as s:

        async def beat(cost: float) -> int:
            async with s.post(proxy.url + "/meter/heartbeat",
                              json={"agent": "mallory", "metrics": {"cost_usd": cost}}) as r:  # fmt: skip
                return r.status

        assert await beat(10_000_000) == 400  # one report of $10M: refused, not counted
        assert await beat(150) == 400  # past heartbeat.max_cost_usd ($100)
        assert await beat(100) == 200
        assert await _chat(s, proxy.url, **{"X-Agent-Id": "alice"}) == 200  # $100 of $200 left
        async with s.get(proxy.url + "/metrics") as r:
            text = await r.text()
        assert 'meterproxy_heartbeats_total{result="invalid_heartbeat"} 2.0' in text
        assert 'meterproxy_heartbeats_total{result="recorded"} 1.0' in text


async def test_heartbeats_are_off_on_an_open_address_without_keys(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(host="0.0.0.0")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/meter/heartbeat",
                          json={"agent": "a", "metrics": {"cost_usd": 1}}) as r:  # fmt: skip
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "heartbeats_disabled"
    on = await make_proxy(host="0.0.0.0", heartbeat_enabled="true")
    async with aiohttp.ClientSession() as s:
        async with s.post(on.url + "/meter/heartbeat",
                          json={"agent": "a", "metrics": {"cost_usd": 1}}) as r:  # fmt: skip
            assert r.status == 200


async def test_one_agent_cannot_spend_or_pause_anothers_intent(
    make_proxy: ProxyFactory, fake: Any, db_url: str
) -> None:
    upstream, _ = fake
    upstream.script.update(prompt_tokens=9)  # as tiktoken counts "hi" in one message
    text = (
        # Each call reserves $0.000075 (10 prompt tokens with the margin, 5 output tokens)
        # and costs $0.0000725: three fit in $0.00028, a fourth only capped at 3 tokens
        # ($0.0000525), a fifth not at all.
        "budgets:\n  defaults: {max_cost_per_intent_usd: 0.00028, action_on_breach: pause}\n"
    )
    proxy = await make_proxy(db_url=db_url, admin_token=ADMIN,
                             policies=parse_config(yaml.safe_load(text)).policies)  # fmt: skip
    async with aiohttp.ClientSession() as s:
        # Agent A uses B's intent id until its own intent of that id is spent.
        statuses = [await _chat(s, proxy.url, **{"X-Agent-Id": "agent-a",
                                                 "X-Intent-Id": "b-task"}) for _ in range(5)]  # fmt: skip
        assert statuses == [200, 200, 200, 200, 429]
        assert upstream.caps == [5, 5, 5, 3]
        # B's intent of that id is untouched, and B is not paused.
        assert (
            await _chat(s, proxy.url, **{"X-Agent-Id": "agent-b", "X-Intent-Id": "b-task"}) == 200
        )
        async with s.get(proxy.url + "/meter/agents/agent-b", headers=AUTH) as r:
            assert (await r.json())["state"] == "active"
        async with s.get(proxy.url + "/meter/agents/agent-a", headers=AUTH) as r:
            assert (await r.json())["state"] == "paused"
        async with s.get(proxy.url + "/meter/intents/b-task", headers=AUTH) as r:
            assert r.status == 409  # two agents' intents: say which
        async with s.get(proxy.url + "/meter/agents/agent-b/intents/b-task", headers=AUTH) as r:
            view = await r.json()
        assert view["agent"] == "agent-b" and view["spent_usd"] == "0.0000725"
