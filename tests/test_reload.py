from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import openai

from proxy.pricing import bundled_pricing_path
from tests.conftest import ProxyFactory

HI = [{"role": "user", "content": "hi"}]


async def wait_for(predicate: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def ours(record: logging.LogRecord) -> bool:
    """Our own log lines (not, say, asyncio reporting a client a previous test left open)."""
    return record.name.startswith("meterproxy")


async def test_pricing_edit_applies_to_the_next_call_and_a_broken_edit_is_refused(
    make_proxy: ProxyFactory, tmp_path: Path, caplog: Any
) -> None:
    pricing = tmp_path / "pricing.yaml"
    shutil.copy(bundled_pricing_path(), pricing)
    proxy = await make_proxy(pricing_path=pricing, reload_interval_seconds=0.05)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk", max_retries=0)

    async def cost() -> str:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
        return raw.headers["x-meter-cost-usd"]

    assert await cost() == "0.00008"  # 12 * 2.50 + 5 * 10.00 per 1M
    old_version = proxy.svc.prices.version
    text = pricing.read_text()
    edited = text.replace(
        "      gpt-4o:\n        input: 2.50", "      gpt-4o:\n        input: 5.00"
    )
    assert edited != text
    pricing.write_text(edited)
    await wait_for(lambda: proxy.svc.prices.version != old_version)
    assert await cost() == "0.00011"  # 12 * 5.00 + 5 * 10.00 per 1M
    good_version = proxy.svc.prices.version

    caplog.set_level(logging.ERROR, logger="meterproxy")
    broken = edited.replace(
        "      gpt-4o:\n        input: 5.00", "      gpt-4o:\n        input: 5e-06"
    )
    pricing.write_text(broken)
    await wait_for(lambda: any(ours(r) and r.levelno == logging.ERROR for r in caplog.records))
    await asyncio.sleep(0.3)  # several more polls: still one ERROR
    errors = [r.getMessage() for r in caplog.records if ours(r) and r.levelno == logging.ERROR]
    line = broken.splitlines().index("        input: 5e-06") + 1
    assert errors == [
        f"pricing not reloaded, previous prices stay: {pricing}:{line}: key"
        " 'providers.openai.models.gpt-4o.input': bad value '5e-06': looks like a price per"
        " token; pricing.yaml is in USD per 1M tokens (did you mean 5?)"
    ]
    assert proxy.svc.prices.version == good_version
    assert await cost() == "0.00011"


async def test_config_reload_swaps_policies(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    from proxy.app import RELOADER, Options
    from proxy.config_file import load_config

    path = tmp_path / "config.yaml"
    path.write_text("budgets:\n  defaults:\n    max_requests_per_minute: 5\n")
    base = load_config(path)
    proxy = await make_proxy(options=Options(reparse=lambda: load_config(path)), path=path,
                             policies=base.policies)  # fmt: skip
    assert proxy.svc.enforcer.policies.defaults is not None
    assert proxy.svc.enforcer.policies.defaults.requests_per_minute == 5
    path.write_text("budgets:\n  defaults:\n    max_requests_per_minute: 7\n")
    await proxy.server.app[RELOADER].check(force=True)
    assert proxy.svc.enforcer.policies.defaults.requests_per_minute == 7
