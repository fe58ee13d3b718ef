from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from proxy.cli import main
from proxy.pricing import parse_price_table
from tests.conftest import ROOT, ProxyFactory

HI = [{"role": "user", "content": "hi"}]


def run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def arun(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """The CLI runs its own event loop: from an async test, in a thread."""
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_module_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("meterproxy ")


def test_check_ok_and_broken(capsys: Any, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "check")
    assert code == 0 and "OK" in out and "70 models" in out
    bad = tmp_path / "c.yaml"
    bad.write_text("budgets:\n  defaults:\n    max_cost_per_day_usd: lots\n")
    code, out, err = run(capsys, "check", "--config", str(bad))
    assert code == 2 and out == ""
    assert err == (
        f"meterproxy: {bad}:3: key 'budgets.defaults.max_cost_per_day_usd': bad value 'lots':"
        " must be a number\n"
    )
    pricing = tmp_path / "p.yaml"
    pricing.write_text("updated: 2026-01-01\nproviders:\n  x:\n    source: s\n    models:\n"
                       "      m: {input: 0.0000025, output: 1}\n")  # fmt: skip
    code, _, err = run(capsys, "check", "--pricing", str(pricing))
    assert code == 2
    assert err.startswith(f"meterproxy: {pricing}:6: key 'providers.x.models.m.input'")
    assert "looks like a price per token" in err


def test_price(capsys: Any) -> None:
    code, out, _ = run(capsys, "price", "openai/gpt-4o-2024-08-06", "--input", "1000",
                       "--output", "500", "--cached", "200")  # fmt: skip
    assert code == 0
    assert out.splitlines()[0].startswith("openai/gpt-4o-2024-08-06 -> gpt-4o (openai)")
    # 800 * 2.50 + 200 * 1.25 + 500 * 10.00 = 2000 + 250 + 5000 per 1M
    assert out.splitlines()[-1] == "  cost   $0.00725"
    code, _, err = run(capsys, "price", "nope-model", "--input", "1", "--output", "1")
    assert code == 1 and "nope-model" in err


def test_pricing_import(capsys: Any, tmp_path: Path) -> None:
    src = ROOT.parent / "shared" / "reference" / "litellm-model-prices.json"
    if not src.exists():
        src = tmp_path / "litellm.json"
        src.write_text(json.dumps({
            "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                       "cache_read_input_token_cost": 1.25e-06,
                       "input_cost_per_token_priority": 4.25e-06,
                       "output_cost_per_token_priority": 1.7e-05,
                       "litellm_provider": "openai", "mode": "chat", "max_output_tokens": 16384},
            "gemini/gemini-2.5-pro": {"input_cost_per_token": 1.25e-06,
                                      "output_cost_per_token": 1e-05,
                                      "input_cost_per_token_above_200k_tokens": 2.5e-06,
                                      "output_cost_per_token_above_200k_tokens": 1.5e-05,
                                      "litellm_provider": "gemini", "mode": "chat"},
        }))  # fmt: skip
    out_file = tmp_path / "imported.yaml"
    code, _, err = run(capsys, "pricing", "import", str(src), "-o", str(out_file),
                       "--provider", "openai,gemini")  # fmt: skip
    assert code == 0 and err.startswith("imported ")
    table = parse_price_table(out_file.read_text())
    gpt = table.resolve("gpt-4o")
    assert gpt is not None and gpt.rates.input == 2_500_000 and gpt.rates.cached_input == 1_250_000
    assert gpt.tiers["priority"].output == 17_000_000 and gpt.max_output == 16384
    pro = table.resolve("gemini-2.5-pro")
    assert pro is not None and pro.long_context_above == 200_000
    assert pro.long_context is not None and pro.long_context.input == 2_500_000
    data = yaml.safe_load(out_file.read_text())
    assert set(data["providers"]) == {"openai", "gemini"}


async def test_report_on_a_real_ledger(
    make_proxy: ProxyFactory, fake: Any, tmp_path: Path, capsys: Any
) -> None:
    db = tmp_path / "ledger.db"
    proxy = await make_proxy(db_url=f"sqlite:///{db}")
    for agent, model, n in (("alpha", "gpt-4o", 3), ("beta", "gpt-4o-mini", 2), ("alpha", "o3", 1)):
        c = openai.AsyncOpenAI(base_url=f"{proxy.url}/agents/{agent}/v1", api_key="k",
                               max_retries=0)  # fmt: skip
        for _ in range(n):
            await c.chat.completions.create(model=model, messages=HI)
    await proxy.flushed()

    code, out, _ = await arun(capsys, "report", "--db", str(db), "--format", "json")
    assert code == 0
    report = json.loads(out)
    by_agent = {r["agent"]: r for r in report["rows"]}
    # alpha: 3 x gpt-4o (12*2.5 + 5*10 = 80 per 1M) + 1 x o3 (12*2 + 5*8 = 64 per 1M)
    assert by_agent["alpha"]["cost_usd"] == "0.000304"
    assert by_agent["alpha"]["llm_calls"] == 4
    # beta: 2 x gpt-4o-mini (12*0.15 + 5*0.6 = 4.8 per 1M)
    assert by_agent["beta"]["cost_usd"] == "0.0000096"
    total = sum(Decimal(r["cost_usd"]) for r in report["rows"])
    assert Decimal(report["total"]["cost_usd"]) == total == Decimal("0.0003136")
    assert report["total"]["input_tokens"] == 6 * 12

    code, out, _ = await arun(capsys, "report", "--db", str(db), "--by", "model", "--window", "day",
                       "--format", "csv")  # fmt: skip
    lines = out.strip().splitlines()
    assert lines[0].startswith("model,window_start,cost_usd,requests,llm_calls")
    assert lines[-1].startswith("TOTAL,,0.0003136,")
    assert sum(Decimal(line.split(",")[2]) for line in lines[1:-1]) == Decimal("0.0003136")

    code, out, _ = await arun(capsys, "report", "--db", str(db), "--agent", "beta")
    assert code == 0
    assert out.splitlines()[2].split()[:2] == ["beta", "2"]
    assert "exact total 0.0000096 USD" in out

    code, _, err = await arun(capsys, "report", "--db", str(db), "--since", "yesterday-ish")
    assert code == 2 and "--since='yesterday-ish' is not a date" in err


@pytest.mark.parametrize("argv", [["agents"], ["pause", "a1"], ["resume", "a1"]])
def test_admin_commands_need_a_token(capsys: Any, argv: list[str], monkeypatch: Any) -> None:
    monkeypatch.delenv("METERPROXY_ADMIN_TOKEN", raising=False)
    code, _, err = run(capsys, *argv)
    assert code == 2 and "no admin token" in err


async def test_spend_api_and_cli_report_give_the_same_numbers(
    make_proxy: ProxyFactory, tmp_path: Path, capsys: Any
) -> None:
    import aiohttp

    db = tmp_path / "ledger.db"
    token = "t" * 20
    proxy = await make_proxy(db_url=f"sqlite:///{db}", admin_token=token)
    for agent, model in (("a", "gpt-4o"), ("b", "o3"), ("a", "gpt-4o-mini")):
        c = openai.AsyncOpenAI(
            base_url=f"{proxy.url}/agents/{agent}/v1", api_key="k", max_retries=0
        )
        await c.chat.completions.create(model=model, messages=HI)
    await proxy.flushed()
    for query in (
        "by=agent",
        "by=model&window=day",
        "by=upstream&window=hour",
        "by=intent&window=month",
    ):
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:
            async with s.get(f"{proxy.url}/meter/spend?{query}") as r:
                api = await r.json()
            async with s.get(f"{proxy.url}/meter/spend?{query}&format=csv") as r:
                api_csv = await r.text()
        argv = ["report", "--db", str(db)]
        for part in query.split("&"):
            k, v = part.split("=")
            argv += [f"--{k}", v]
        _, out, _ = await arun(capsys, *argv, "--format", "json")
        assert json.loads(out) == api
        _, out, _ = await arun(capsys, *argv, "--format", "csv")
        assert out == api_csv


def test_serve_lifts_the_open_files_limit_to_the_hard_one() -> None:
    """Each open stream holds two sockets: a soft limit of 1,024 would refuse the 513th
    concurrent stream. serve lifts it; a limit already at the hard one stays."""
    import resource

    from proxy.cli_serve import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if want <= 256:
        pytest.skip(f"hard open-files limit {hard} leaves nothing to lift")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_files_limit() == (256, want)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (want, hard)
        assert raise_open_files_limit() == (want, want)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
