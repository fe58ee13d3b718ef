"""Pure budget logic: policies, calendar windows, the decision, the refusal message."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.admission import (
    _MEMO_MAX,
    Check,
    breaches,
    decisive,
    make_plan,
    plan_admission,
    plan_limits,
)
from proxy.policy import PolicySet, parse_policy, validate_policy_json
from proxy.refusals import refusal_message
from proxy.schema import FieldError, Section
from proxy.windows import Calendar


def ts(text: str, tz: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("tz", "now", "kind", "start", "end"),
    [
        ("UTC", "2026-11-29T23:59:59", "day", "2026-11-29T00:00:00", "2026-11-30T00:00:00"),
        ("Europe/Berlin", "2026-11-29T00:30:00", "day", "2026-11-29T00:00:00", "2026-11-30T00:00:00"),
        # ISO week: Monday to Monday.
        ("Europe/Berlin", "2026-11-29T12:00:00", "week", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
        ("America/New_York", "2026-12-31T23:00:00", "month", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("Asia/Kolkata", "2026-11-29T10:45:00", "hour", "2026-11-29T10:00:00", "2026-11-29T11:00:00"),
        # The spring-forward day in Berlin has 23 hours.
        ("Europe/Berlin", "2026-03-29T12:00:00", "day", "2026-03-29T00:00:00", "2026-03-30T00:00:00"),
    ],
)  # fmt: skip
def test_calendar_windows(tz: str, now: str, kind: str, start: str, end: str) -> None:
    cal = Calendar(tz)
    s, e = cal.window(kind, ts(now, tz))
    assert (s, e) == (ts(start, tz), ts(end, tz))


def test_dst_day_is_23_hours() -> None:
    cal = Calendar("Europe/Berlin")
    s, e = cal.window("day", ts("2026-03-29T12:00:00", "Europe/Berlin"))
    assert e - s == 23 * 3600


def test_stable_span_is_the_stretch_no_window_crosses() -> None:
    cal = Calendar("Asia/Kathmandu")  # UTC+5:45: hours and days start at :15 UTC
    now = ts("2026-11-29T23:59:30", "Asia/Kathmandu")
    assert cal.stable_span(now) == (now - 30, now + 30)
    assert cal.stable_span(now + 30) == (now + 30, now + 90)  # the next day's first minute


def test_limits_and_spend_keys_are_reused_within_a_minute_and_rebuilt_across_windows() -> None:
    cal = Calendar("UTC")
    policies = PolicySet(agents={"a": parse_policy(Section({"max_cost_per_day_usd": 5}))})
    plan = make_plan(policies, "a")
    before = ts("2026-11-29T23:59:10", "UTC")
    first = plan_limits(plan, "a", "i", cal, before)
    assert plan_limits(plan, "a", "i", cal, before + 40) is first  # the same minute
    assert plan_limits(plan, "a", "j", cal, before) is not first  # another intent
    (day,) = [lim for lim in first if lim.name == "max_cost_per_day_usd"]
    (next_day,) = [lim for lim in plan_limits(plan, "a", "i", cal, before + 60)
                   if lim.name == "max_cost_per_day_usd"]  # fmt: skip
    assert (day.key.start, next_day.key.start) == (before - 86350, before + 50)
    spend = plan_admission(plan, "a", "i", 7, cal, before + 60).spend_keys
    assert {k.start for k in spend if k.kind == "cost:day"} == {before + 50}
    for n in range(_MEMO_MAX + 10):  # many intents in one minute: the memo stays bounded
        plan_limits(plan, "a", f"intent-{n}", cal, before + 60)
    assert len(plan.memo) <= _MEMO_MAX + 1


def test_policy_parsing() -> None:
    p = parse_policy(Section({
        "max_cost_per_day_usd": 50, "max_cost_per_hour_usd": "2.5", "max_intents_per_day": 10,
        "max_requests_per_minute": 60, "max_cost_per_intent_usd": 0.5,
        "action_on_breach": "pause", "loop_guard": {"max_identical_requests": 3, "window_seconds": 60},
    }))  # fmt: skip
    assert p.cost == {"day": 50 * 10**12, "hour": 2_500_000_000_000}
    assert p.intents == {"day": 10} and p.requests_per_minute == 60
    assert p.cost_per_intent == 500_000_000_000 and p.action == "pause"
    assert p.loop_guard is not None and p.loop_guard.max_identical_requests == 3


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"max_cost_per_day_usd": -1}, "max_cost_per_day_usd", "must be >= 0"),
        ({"max_cost_per_dya_usd": 1}, "max_cost_per_dya_usd", "unknown key"),
        ({"action_on_breach": "shout"}, "action_on_breach", "must be one of block, alert, pause"),
        ({"max_intents_per_day": 1.5}, "max_intents_per_day", "must be a whole number"),
        ({"loop_guard": {"max_identical_requests": 0, "window_seconds": 1}}, "loop_guard.max_identical_requests", "must be >= 1"),
    ],
)  # fmt: skip
def test_bad_policies_name_the_key(data: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(FieldError) as e:
        validate_policy_json(data)
    assert e.value.key == key and reason in e.value.reason


def test_global_cannot_pause() -> None:
    with pytest.raises(FieldError) as e:
        parse_policy(Section({"action_on_breach": "pause"}), scope="global")
    assert "use block for global" in e.value.reason


def check(**kw: object) -> Check:
    base: dict[str, object] = dict(scope="agent", subject="a", limit="max_cost_per_day_usd",
                                   money=True, limit_value=100, used=50, reserved=20, amount=30,
                                   action="block", resets_at=1000.0)  # fmt: skip
    base.update(kw)
    return Check(**base)  # type: ignore[arg-type]


def test_admission_arithmetic_is_inclusive() -> None:
    assert not check().breached  # 50 + 20 + 30 == 100: admitted
    assert check(amount=31).breached


def test_decisive_prefers_pause_then_money_then_tightest() -> None:
    a = check(limit="max_cost_per_day_usd", amount=40, used=60)  # remaining 20
    b = check(limit="max_cost_per_hour_usd", amount=40, used=70)  # remaining 10
    c = check(
        limit="max_requests_per_minute", money=False, limit_value=1, used=1, reserved=0, amount=1
    )
    alert = check(action="alert", amount=1000)
    assert decisive(breaches([a, b, c, alert])) is b
    p = check(limit="max_cost_per_week_usd", action="pause", amount=1000)
    assert decisive([a, p]) is p
    assert decisive([alert]) is None


def test_refusal_message_names_everything() -> None:
    cal = Calendar("UTC")
    now = ts("2026-11-29T21:00:00", "UTC")
    c = check(
        subject="research-agent", limit_value=50 * 10**12, used=49_970_000_000_000,
        reserved=20_000_000_000, amount=45_000_000_000, resets_at=ts("2026-11-30T00:00:00", "UTC"),
    )  # fmt: skip
    assert refusal_message(c, cal, now) == (
        "agent 'research-agent' reached max_cost_per_day_usd: used $49.9700 of $50.0000"
        " ($0.0200 reserved by calls in flight); this call could cost up to $0.0450 but only"
        " $0.0100 remains; resets at 2026-11-30T00:00:00+00:00 (in 3h00m)"
    )
    intent = check(scope="intent", subject="int_1", limit="max_cost_per_intent_usd", resets_at=None)
    assert "does not reset" in refusal_message(intent, cal, now)
