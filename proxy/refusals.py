"""The words of a refusal: which limit, how much of it is used, what remains, when it
resets, as a person can tell the numbers apart. Pure, like `proxy.admission`."""

from __future__ import annotations

import math

from proxy.admission import GLOBAL, Check
from proxy.money import usd_sig
from proxy.policy import LOOP_CODE, PROGRESS_LIMIT, RATE_LIMIT
from proxy.windows import Calendar


def _describe_scope(check: Check) -> str:
    if check.scope == GLOBAL:
        return "all agents together"
    if check.scope == "user":
        return f"end user '{check.subject}'"
    return f"{check.scope} '{check.subject}'"


def _amounts(check: Check, *values: int) -> list[str]:
    """Amounts as a person can tell apart: enough significant digits, in one format."""
    if not check.money:
        return [str(v) for v in values]
    return [f"${s}" for s in usd_sig(*values)]


def refusal_message(check: Check, calendar: Calendar, now: float) -> str:
    if check.limit == RATE_LIMIT:
        return (f"{_describe_scope(check)} reached {RATE_LIMIT}: {check.note}; calls are"
                f" refused until the rate falls (the window moves every minute)")  # fmt: skip
    if check.limit == PROGRESS_LIMIT:
        since, limit, amount = _amounts(check, check.used - check.offset,
                                        check.limit_value - check.offset, check.amount)  # fmt: skip
        return (f"{_describe_scope(check)} reached {PROGRESS_LIMIT}: spent {since} since its"
                f" last progress report (limit {limit}); this call could cost up to {amount}."
                " Report progress (a heartbeat with status: progress), or close the"
                " intent")  # fmt: skip
    if check.limit == LOOP_CODE:
        return (
            f"agent '{check.subject}' sent the same request {check.used + 1} times within the"
            f" loop guard's window (limit {check.limit_value}): this looks like a runaway loop"
        )
    left = max(check.remaining, 0)
    used, limit, reserved, amount, remains = _amounts(
        check, check.used, check.limit_value, check.reserved, check.amount, left
    )
    parts = [f"{_describe_scope(check)} reached {check.limit}: used {used} of {limit}"]
    if check.reserved:
        parts.append(f" ({reserved} reserved by calls in flight)")
    if check.money and check.amount:
        parts.append(f"; this call could cost up to {amount} but only {remains} remains")
    if check.resets_at is None:
        parts.append("; this limit is for the intent's lifetime and does not reset")
    else:
        wait = max(int(check.resets_at - now), 0)
        parts.append(f"; resets at {calendar.iso(check.resets_at)} (in {duration(wait)})")
    return "".join(parts)


def pause_reason(check: Check, calendar: Calendar, now: float) -> str:
    used, limit = _amounts(check, check.used, check.limit_value)
    return (
        f"breached {check.limit} at {calendar.iso(now)}: {_describe_scope(check)} used"
        f" {used} of {limit}"
    )


def retry_after(check: Check, now: float) -> int | None:
    if check.resets_at is None or check.action == "pause":
        return None
    return max(math.ceil(check.resets_at - now), 1)


def duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
