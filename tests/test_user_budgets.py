"""End-user budgets: one abusive customer cannot spend the agent's whole budget (issue 13,
point 9), on both counter stores."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import yaml

from proxy.config_file import parse_config
from tests.conftest import ProxyFactory

HI = [{"role": "user", "content": "hi"}]
PER_CALL = 80_000_000  # gpt-4o, 12 in and 5 out: $0.00008 in pico-USD


def policies(text: str) -> Any:
    return parse_config(yaml.safe_load(text)).policies


def sdk(proxy: Any, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/support/v1", api_key="sk-x",
                              max_retries=0, **kw)  # fmt: skip


async def test_one_customer_is_stopped_and_the_others_go_on(
    make_proxy: ProxyFactory, db_url: str
) -> None:
    proxy = await make_proxy(db_url=db_url, policies=policies("""
budgets:
  agents:
    support: {max_cost_per_day_usd: 1}
  user_defaults: {max_cost_per_day_usd: 0.00025}
  users:
    vip-7: {max_cost_per_day_usd: 0.01}
"""))  # fmt: skip
    client = sdk(proxy)
    admitted = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(50):
            await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5,
                                                 user="abuser")  # fmt: skip
            admitted += 1
    body = e.value.body
    assert body["code"] == "max_cost_per_day_usd"  # type: ignore[index]
    assert body["message"].startswith("end user 'abuser' reached max_cost_per_day_usd")  # type: ignore[index]
    # Each reserves about $0.000075 and costs $0.00008: after 3 ($0.00024), what remains
    # ($0.00001) does not cover a fourth one's input.
    assert admitted == 3
    # Another customer of the same agent, and one with a larger budget, go on.
    await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5, user="b")
    for _ in range(5):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5,
                                             user="vip-7")  # fmt: skip
    # A call without an end user is under the agent's budget only.
    await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)
    await proxy.flushed()
    rows = [r for r in await proxy.rows() if r["status"] == 200]
    spent = {}
    for r in rows:
        spent[r["end_user"]] = spent.get(r["end_user"], 0) + r["cost_pico"]
    assert spent == {"abuser": 3 * PER_CALL, "b": PER_CALL, "vip-7": 5 * PER_CALL,
                     None: PER_CALL}  # fmt: skip

    # The same customer of another agent is another customer.
    other = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/sales/v1", api_key="sk-x",
                               max_retries=0)  # fmt: skip
    await other.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5, user="abuser")


async def test_a_restart_remembers_what_a_customer_spent(
    make_proxy: ProxyFactory, db_url: str
) -> None:
    text = "budgets:\n  user_defaults: {max_cost_per_day_usd: 0.00017}\n"
    proxy = await make_proxy(db_url=db_url, policies=policies(text))
    client = sdk(proxy, default_headers={"X-Meter-User": "carol"})
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=5)
    await proxy.flushed()
    await proxy.server.close()

    again = await make_proxy(db_url=db_url, policies=policies(text))
    with pytest.raises(openai.RateLimitError):
        await sdk(again, default_headers={"X-Meter-User": "carol"}).chat.completions.create(
            model="gpt-4o", messages=HI, max_tokens=5)  # fmt: skip
    await sdk(again, default_headers={"X-Meter-User": "dave"}).chat.completions.create(
        model="gpt-4o", messages=HI, max_tokens=5)  # fmt: skip


def test_an_end_user_policy_takes_no_intent_limits() -> None:
    from proxy.schema import FieldError

    with pytest.raises(FieldError) as e:
        parse_config({"budgets": {"user_defaults": {"max_cost_per_intent_usd": 1}}})
    assert e.value.key == "budgets.user_defaults.max_cost_per_intent_usd"
    assert "an end user's policy takes cost and request limits only" in e.value.reason
