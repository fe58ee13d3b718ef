from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from proxy.records import CallRecord
from proxy.reports import ReportError, parse_time, spend_report
from proxy.storage import Storage, open_storage
from proxy.windows import Calendar
from tests.records import call_record

TZ = "America/New_York"


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(TZ)).timestamp()


def call(i: int, started: float, agent: str, cost: int | None, model: str = "gpt-4o",
         intent: str | None = None) -> CallRecord:  # fmt: skip
    return call_record(
        f"r{i}", started, ended_at=started + 1, agent=agent, intent=intent,
        model_requested=model, model_served=model,
        model_priced=model if cost is not None else None, cost_pico=cost, price_version="v",
        ttfb_ms=1.0,
    )  # fmt: skip


async def test_day_windows_in_a_time_zone_and_exact_totals(storage: Storage) -> None:
    records = [
        # 23:50 on Nov 2 local is Nov 3 in UTC: it must count for Nov 2.
        call(1, at("2026-11-02T23:50:00"), "a", 1_000_000_001),
        call(2, at("2026-11-03T00:10:00"), "a", 2_000_000_000),
        call(3, at("2026-11-03T12:00:07"), "b", 333_333_333_333),
        call(4, at("2026-11-03T13:00:00"), "b", None, model="mystery"),
    ]
    await storage.write_calls(records)
    cal = Calendar(TZ)
    report = await spend_report(storage, cal, by="agent", window="day")
    rows = [(r.key, cal.iso(r.window_start or 0)[:10], r.totals.cost_pico, r.totals.unpriced)
            for r in report.rows]  # fmt: skip
    assert rows == [
        ("a", "2026-11-02", 1_000_000_001, 0),
        ("b", "2026-11-03", 333_333_333_333, 1),
        ("a", "2026-11-03", 2_000_000_000, 0),
    ]
    assert report.total.cost_pico == sum(r.totals.cost_pico for r in report.rows)
    data = report.to_json()
    assert data["total"]["cost_usd"] == "0.336333333334"
    assert sum(Decimal(r["cost_usd"]) for r in data["rows"]) == Decimal("0.336333333334")


async def test_ragged_edges_come_from_call_rows(storage: Storage) -> None:
    await storage.write_calls([
        call(1, at("2026-11-03T10:01:00"), "a", 1),
        call(2, at("2026-11-03T10:07:00"), "a", 10),
        call(3, at("2026-11-03T10:20:00"), "a", 100),
        call(4, at("2026-11-03T10:31:00"), "a", 1000),
    ])  # fmt: skip
    cal = Calendar(TZ)
    # 10:05 .. 10:32: the 10:15-10:30 bucket from rollups, the edges from calls.
    report = await spend_report(storage, cal, since=at("2026-11-03T10:05:00"),
                                until=at("2026-11-03T10:32:00"))  # fmt: skip
    assert report.total.cost_pico == 1110
    report = await spend_report(storage, cal, since=at("2026-11-03T10:05:00"),
                                until=at("2026-11-03T10:06:00"))  # fmt: skip
    assert report.total.cost_pico == 0


async def test_rollups_survive_pruning_and_replays_are_not_counted_twice(
    storage: Storage,
) -> None:
    rows = [call(i, at("2026-10-01T09:00:00") + i, "a", 5, intent="t1") for i in range(3)]
    await storage.write_calls(rows)
    await storage.write_calls(rows[:2])  # a replay: same ids
    assert await storage.count_calls() == 3
    deleted = await storage.prune_calls(at("2026-11-01T00:00:00"))
    assert deleted == 3 and await storage.count_calls() == 0
    cal = Calendar(TZ)
    report = await spend_report(storage, cal, window="month", since=at("2026-10-01T00:00:00"),
                                until=at("2026-11-01T00:00:00"))  # fmt: skip
    assert [(r.key, r.totals.cost_pico, r.totals.llm_calls) for r in report.rows] == [("a", 15, 3)]
    intent = await storage.intent("a", "t1")
    assert intent is not None and (intent.requests, intent.cost_pico) == (3, 15)


async def test_by_intent_and_bad_parameters(storage: Storage) -> None:
    await storage.write_calls([call(1, at("2026-11-03T10:00:00"), "a", 7, intent="i1"),
                               call(2, at("2026-11-03T10:00:01"), "a", 9)])  # fmt: skip
    report = await spend_report(storage, Calendar(TZ), by="intent")
    assert [(r.key, r.totals.cost_pico) for r in report.rows] == [("", 9), ("i1", 7)]
    with pytest.raises(ReportError):
        await spend_report(storage, Calendar(TZ), by="color")
    with pytest.raises(ReportError):
        await spend_report(storage, Calendar(TZ), window="fortnight")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", at("2026-11-01T00:00:00")),
        ("2026-11-01T09:30", at("2026-11-01T09:30:00")),
        ("2026-11-01T09:30:00+00:00", datetime.fromisoformat("2026-11-01T09:30:00+00:00").timestamp()),
        ("7d", 1_000_000.0 - 7 * 86400),
        ("90m", 1_000_000.0 - 5400),
        ("1800000000", 1_800_000_000.0),
    ],
)  # fmt: skip
def test_parse_time(text: str, expected: Any) -> None:
    assert parse_time(text, Calendar(TZ), 1_000_000.0, "since") == expected


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"])
async def test_windows_match_a_brute_force_grouping_across_dst(storage: Storage, tz: str) -> None:
    """Calls spread over four months (two DST changes); every report equals grouping each
    call by `Calendar.window_start` one by one."""
    import random

    rnd = random.Random(11)
    start = datetime.fromisoformat("2026-02-20T00:00:00+00:00").timestamp()
    records = [
        call(i, start + rnd.random() * 120 * 86400, rnd.choice(["a", "b", "c"]),
             rnd.randrange(1, 10**9), model=rnd.choice(["m1", "m2"]))
        for i in range(3000)
    ]  # fmt: skip
    await storage.write_calls(records)
    cal = Calendar(tz)
    since = start + 5 * 86400 + 437.5  # ragged: not on a bucket boundary
    until = start + 110 * 86400 - 61
    for window in ("hour", "day", "week", "month"):
        for by, agent in (("agent", None), ("model", None), ("model", "b"), ("intent", None)):
            report = await spend_report(storage, cal, by=by, window=window, since=since,
                                        until=until, agent=agent)  # fmt: skip
            expected: dict[tuple[str, float], int] = {}
            for r in records:
                if not since <= r.started_at < until or (agent and r.agent != agent):
                    continue
                key = {"agent": r.agent, "model": r.model_requested, "intent": ""}[by]
                w = cal.window_start(window, r.started_at)
                expected[(key or "", w)] = expected.get((key or "", w), 0) + (r.cost_pico or 0)
            got = {(row.key, row.window_start): row.totals.cost_pico for row in report.rows}
            assert got == expected, (window, by, agent)


async def test_retention_prunes_call_rows_but_reports_keep_them(
    make_proxy: Any, tmp_path: Path
) -> None:
    from tests.conftest import FakeClock

    db = tmp_path / "ledger.db"
    old = await open_storage(f"sqlite:///{db}")
    await old.write_calls([call(i, at("2026-08-10T12:00:00") + i, "a", 1_000) for i in range(5)]
                          + [call(9, at("2026-11-20T12:00:00"), "a", 7)])  # fmt: skip
    await old.close()
    from proxy.app import Options

    clock = FakeClock(at("2026-11-25T12:00:00"))
    proxy = await make_proxy(
        db_url=f"sqlite:///{db}", retention_days=30, options=Options(clock=clock)
    )
    storage = proxy.svc.storage
    for _ in range(200):
        if await storage.count_calls() == 1:
            break
        await asyncio.sleep(0.01)
    assert await storage.count_calls() == 1  # August's rows are gone, November's stays
    report = await spend_report(storage, Calendar(TZ), window="month")
    assert [(cal_month(r.window_start), r.totals.cost_pico) for r in report.rows] == [
        ("2026-08", 5_000), ("2026-11", 7),
    ]  # fmt: skip


def cal_month(t: float | None) -> str:
    return Calendar(TZ).iso(t or 0)[:7]
