"""The dashboard in a real headless Chromium (Debian's `chromium`), driven by Playwright."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config_file import parse_config
from tests.conftest import ROOT, Proxy, ProxyFactory

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("METERPROXY_REQUIRE_CHROMIUM"),
    reason="needs Debian's chromium (installed by .ci/run)",
)
TOKEN = "dashboard-admin-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ARTIFACTS = ROOT / "test-artifacts"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield b
        await b.close()


async def seeded(make_proxy: ProxyFactory, fake: Any) -> Proxy:
    upstream, _ = fake
    policies = parse_config({"budgets": {"agents": {
        "research-agent": {"max_cost_per_day_usd": 0.05, "max_cost_per_week_usd": 1},
        "billing-agent": {"max_cost_per_day_usd": 0.005, "action_on_breach": "pause"},
    }}}).policies  # fmt: skip
    proxy = await make_proxy(policies=policies, admin_token=TOKEN)
    for agent, intent, model, prompt, n in (
        ("research-agent", "ticket-1", "gpt-4o", 1000, 3),
        ("research-agent", "ticket-2", "gpt-4o-mini", 5000, 2),
        ("support-agent", "chat-9", "claude-sonnet-4-5", 800, 2),
        ("billing-agent", "invoice-7", "gpt-4o", 400, 1),
    ):
        upstream.script.update(prompt_tokens=prompt, completion_tokens=120)
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="k",
                                    max_retries=0, default_headers={"X-Intent-Id": intent})  # fmt: skip
        for _ in range(n):
            await client.chat.completions.create(model=model, messages=HI, max_tokens=200)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/billing-agent/v1", api_key="k",
                                max_retries=0)  # fmt: skip
    long = [{"role": "user", "content": "word " * 2000}]  # its prompt alone: $0.0055 > $0.0028
    with pytest.raises(openai.RateLimitError):  # breaches its day budget: paused
        await client.chat.completions.create(model="gpt-4o", messages=long, max_tokens=200)
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for intent, outcome in (("ticket-1", "success"), ("ticket-2", "failure")):
            async with s.post(f"{proxy.url}/meter/intents/{intent}/outcome",
                              json={"outcome": outcome}) as r:  # fmt: skip
                assert r.status == 200
    await proxy.flushed()
    return proxy


async def api(proxy: Proxy, path: str) -> Any:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.get(proxy.url + path) as r:
            assert r.status == 200
            return await r.json()


async def test_dashboard_shows_the_apis_numbers(
    make_proxy: ProxyFactory, fake: Any, browser: Any
) -> None:
    proxy = await seeded(make_proxy, fake)
    page = await browser.new_page(viewport={"width": 1280, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(proxy.url + "/meter/dashboard")
    await page.fill("#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#agents tr[data-agent='research-agent']")

    agents = {a["agent"]: a for a in (await api(proxy, "/meter/agents"))["agents"]}
    bar_limit = {"day": "max_cost_per_day_usd", "week": "max_cost_per_week_usd",
                 "month": "max_cost_per_day_usd"}  # no month limit: the first one shows  # fmt: skip
    for view in ("day", "week", "month"):
        # The view is rendered by a load that ends after the click: the count of loads
        # before it is passed already (a test that waited for `loads > 0` read the
        # previous view whenever the new load was slower than the page's assertions).
        loads = int(await page.get_attribute("#updated", "data-loads") or 0)
        await page.click(f"#views button[data-view='{view}']")
        await page.wait_for_function(
            "v => document.querySelector('#views button.active').dataset.view === v", arg=view
        )
        await page.wait_for_function(
            "n => Number(document.querySelector('#updated').dataset.loads) > n", arg=loads
        )
        for name, status in agents.items():
            cell = page.locator(f"#agents tr[data-agent='{name}'] td.spent")
            assert await cell.get_attribute("data-usd") == status["windows"][view]["spent_usd"]
            assert await cell.text_content() == "$" + status["windows"][view]["spent_usd"]
        windows = (await api(proxy, "/meter/agents"))["windows"]
        spend = await api(
            proxy, "/meter/spend?by=agent&since=" + windows[view]["starts"].replace("+", "%2B")
        )
        assert await page.get_attribute("#total-cost", "data-usd") == spend["total"]["cost_usd"]
        budget = page.locator("#agents tr[data-agent='research-agent'] td.budget")
        assert await budget.get_attribute("data-limit") == bar_limit[view]

    # research-agent: 3 x gpt-4o (1000 in, 120 out: 2500 + 1200 = 3700 per 1M)
    #               + 2 x gpt-4o-mini (5000 * 0.15 + 120 * 0.6 = 822 per 1M) = $0.012744
    assert agents["research-agent"]["windows"]["day"]["spent_usd"] == "0.012744"
    top_model = page.locator("#models tbody tr").first
    assert await top_model.get_attribute("data-key") == "gpt-4o"
    assert (
        await page.locator("#intents tbody tr[data-key='ticket-1'] td.num").last.get_attribute(
            "data-usd"
        )
        == "0.0111"
    )  # 3 x $0.0037
    assert await page.locator("#calls tbody tr").count() == 9  # 8 calls + 1 refusal
    assert await page.locator("#intents tbody tr").count() == 4  # the refusal is not spend
    assert await page.locator("#chart rect").count() == 3  # one stack, three agents

    await page.click("#views button[data-view='day']")
    await page.wait_for_selector("#agents tr[data-agent='billing-agent'] button.resume")
    # Runway per budget bar, as the API computes it (the last 15 minutes' rate).
    (day,) = [lim for lim in agents["research-agent"]["limits"]
              if lim["limit"] == "max_cost_per_day_usd"]  # fmt: skip
    runway = page.locator("#agents tr[data-agent='research-agent'] td.budget .runway")
    assert await runway.get_attribute("data-runway-seconds") == str(day["runway_seconds"])
    text = await runway.text_content()
    assert day["rate_usd_per_minute"] == "0.0008496"  # $0.012744 over 15 minutes
    if day["runs_out_before_reset"]:  # unless the test runs just before midnight
        assert text == f"{day['runway']} at the current rate ($0.000850/min)"  # 6 places
    # Cost per outcome: ticket-1 succeeded ($0.0111), ticket-2 failed ($0.001644).
    row = page.locator("#outcomes tr[data-agent='research-agent'] td")
    cells = [await row.nth(i).text_content() for i in range(8)]
    assert cells == ["research-agent", "1", "1", "0", "0", "$0.0111", "$0.001644", "$0.0111"]
    assert await page.locator("#outcomes tbody tr").count() == 1
    assert await page.is_hidden("#outcomes-empty")
    assert await page.text_content("#agents tr[data-agent='billing-agent'] td.state") == "paused"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    await page.click("#agents tr[data-agent='billing-agent'] button.resume")
    await page.wait_for_function(
        "() => document.querySelector(\"#agents tr[data-agent='billing-agent'] td.state\").textContent === 'active'"
    )
    assert "billing-agent" not in proxy.svc.enforcer.paused
    assert errors == []


async def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(proxy: Proxy, browser: Any,
                                                                   make_proxy: ProxyFactory) -> None:  # fmt: skip
    proxy = await make_proxy(admin_token=TOKEN)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/meter/dashboard") as r:
            assert r.status == 200
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            html = await r.text()
    assert "http://" not in html and "https://" not in html  # no CDN
    page = await browser.new_page()
    await page.goto(proxy.url + "/meter/dashboard")
    assert await page.is_visible("#login") and not await page.is_visible("#main")
    await page.fill("#token", "not-the-token")
    await page.click("#login button[type=submit]")
    await page.wait_for_function("() => document.querySelector('#login-error').textContent !== ''")
    assert "Authorization: Bearer" in (await page.text_content("#login-error") or "")
    assert not await page.is_visible("#main")


def test_static_files_have_no_external_references() -> None:
    static = Path(__file__).resolve().parent.parent / "proxy" / "static"
    for f in static.iterdir():
        text = f.read_text()
        assert (
            "http://" not in text.replace("http://www.w3.org/2000/svg", "")
            and "https://" not in text
        ), f


async def crowded(make_proxy: ProxyFactory, fake: Any) -> Proxy:
    """25 agents with different spend, one of them on a model with no price, one with a
    per-intent limit."""
    upstream, _ = fake
    policies = parse_config({"budgets": {"agents": {
        "agent-07": {"max_cost_per_day_usd": 1, "max_cost_per_intent_usd": 0.25},
    }}}).policies  # fmt: skip
    proxy = await make_proxy(policies=policies, admin_token=TOKEN)
    for i in range(25):
        upstream.script.update(prompt_tokens=100 * (i + 1), completion_tokens=10)
        client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/agent-{i:02d}/v1", api_key="k",
                                    max_retries=0, default_headers={"X-Intent-Id": f"t{i}"})  # fmt: skip
        await client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
    client = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/agent-03/v1", api_key="k",
                                max_retries=0)  # fmt: skip
    await client.chat.completions.create(model="house-model-v2", messages=HI)  # no price
    async with aiohttp.ClientSession(headers=AUTH) as s:
        for intent, outcome in (("t1", "success"), ("t2", "failure")):
            async with s.post(f"{proxy.url}/meter/intents/{intent}/outcome",
                              json={"outcome": outcome}) as r:  # fmt: skip
                assert r.status == 200
    await proxy.flushed()
    return proxy


async def open_dashboard(proxy: Proxy, browser: Any, width: int) -> Any:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(proxy.url + "/meter/dashboard")
    assert not await page.is_visible("#views")  # the login screen shows no view buttons
    assert not await page.is_visible("#autorefresh")
    await page.fill("#token", TOKEN)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#agents tr[data-agent='agent-24']")
    assert await page.is_visible("#views")
    page.errors = errors
    return page


@pytest.mark.parametrize("width", [390, 1280])
async def test_dashboard_at_phone_and_desktop_width(
    make_proxy: ProxyFactory, fake: Any, browser: Any, width: int
) -> None:
    proxy = await crowded(make_proxy, fake)
    page = await open_dashboard(proxy, browser, width)

    # Biggest spender first: agent-24 sent the longest prompt.
    order = await page.eval_on_selector_all(
        "#agents tbody tr", "rs => rs.map(r => r.dataset.agent)"
    )
    assert order[:3] == ["agent-24", "agent-23", "agent-22"] and len(order) == 25
    # 25 agents, 25 colours, the same in the table and the chart's legend.
    colours = await page.eval_on_selector_all(
        "#agents tbody tr .swatch", "s => s.map(e => getComputedStyle(e).backgroundColor)"
    )
    assert len(set(colours)) == 25
    legend = await page.eval_on_selector_all(
        "#legend span",
        "s => s.map(e => [e.dataset.agent, getComputedStyle(e.firstChild).backgroundColor])",
    )
    assert dict(legend) == dict(zip(order, colours, strict=True))
    assert await page.locator("#chart rect").count() == 25

    # A model with no price is "unpriced", not $0: in the agent's row and the models table.
    spent = page.locator("#agents tr[data-agent='agent-03'] td.spent")
    assert await spent.get_attribute("data-unpriced") == "1"
    assert (await spent.text_content() or "").endswith("+ 1 unpriced")
    model = page.locator("#models tr[data-key='house-model-v2'] td").last
    assert await model.text_content() == "unpriced"
    # The per-intent limit is shown beside the agent's budget.
    per_intent = page.locator("#agents tr[data-agent='agent-07'] .perintent")
    assert await per_intent.get_attribute("data-per-intent") == "0.25"
    assert await per_intent.text_content() == "at most $0.25 per intent (block)"

    # The page fits the window: wide tables scroll inside their box, not the page.
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    # Axis labels keep a readable size on a phone (the chart is drawn at its pixel width).
    heights = await page.eval_on_selector_all(
        "#chart text", "ts => ts.map(t => t.getBoundingClientRect().height)"
    )
    assert len(heights) >= 4 and min(heights) >= 10
    labels = await page.eval_on_selector_all(
        "#chart text",
        "ts => ts.slice(1).map(t => t.getBoundingClientRect()).map(r => [r.left, r.right])",
    )
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(labels)), "axis labels overlap"

    ARTIFACTS.mkdir(exist_ok=True)
    name = "dashboard-phone.png" if width < 500 else "dashboard-desktop.png"
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    assert page.errors == []
