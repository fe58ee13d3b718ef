from __future__ import annotations

from pathlib import Path

import pytest

from proxy.money import usd_exact
from proxy.pricing import PricingError, bundled_pricing_path, load_price_table, parse_price_table
from proxy.usage import Usage
from tests.conftest import ROOT

TABLE = load_price_table(bundled_pricing_path())


def cost(model: str, **usage: int | str) -> str:
    price = TABLE.resolve(model)
    assert price is not None, model
    return usd_exact(price.cost(Usage(**usage)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("requested", "resolved"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),  # never gpt-4o
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4o", "gpt-4o"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own, older price
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic/claude-haiku-4-5@20251001", "claude-haiku-4-5"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),  # alias
        ("gpt-5.1-codex", "gpt-5.1"),  # alias
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        ("o3-mini", "o3-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4o-mini-tts", None),
        ("gpt-4o-audio-preview", None),
        ("no-such-model", None),
    ],
)
def test_resolution(requested: str, resolved: str | None) -> None:
    price = TABLE.resolve(requested)
    assert (price.name if price else None) == resolved


def test_bundled_table_covers_the_required_models() -> None:
    required = [
        "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
        "gpt-4o", "gpt-4o-mini", "o1", "o3", "o3-mini", "o4-mini", "gpt-4", "gpt-3.5-turbo",
        "text-embedding-3-small", "text-embedding-3-large", "claude-3-5-sonnet",
        "claude-3-7-sonnet", "claude-sonnet-4", "claude-sonnet-4-5", "claude-opus-4-1",
        "claude-haiku-4-5", "gemini-2.0-flash", "gemini-2.5-pro", "gemini-2.5-flash",
        "deepseek-chat", "deepseek-reasoner", "mistral-large-latest", "llama-3.3-70b-versatile",
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    ]  # fmt: skip
    missing = [m for m in required if TABLE.resolve(m) is None]
    assert missing == []
    assert set(TABLE.sources) == {"openai", "anthropic", "google", "deepseek", "mistral",
                                  "groq", "together"}  # fmt: skip


def test_the_top_level_file_is_the_bundled_one() -> None:
    assert (ROOT / "pricing.yaml").read_bytes() == bundled_pricing_path().read_bytes()


def test_costs_computed_by_hand() -> None:
    # gpt-4o: $2.50 in, $1.25 cached, $10.00 out per 1M.
    assert cost("gpt-4o", input_tokens=12, output_tokens=5) == "0.00008"
    assert cost("gpt-4o", input_tokens=1000, cached_input_tokens=400, output_tokens=100) == (
        "0.003"  # 600*2.5 + 400*1.25 + 100*10 = 1500 + 500 + 1000 = 3000 per 1M
    )
    # o3: reasoning tokens are output tokens, billed at the output price.
    assert cost("o3", input_tokens=1000, cached_input_tokens=400, output_tokens=500,
                reasoning_tokens=300) == "0.0054"  # fmt: skip
    # service tiers: gpt-4o priority is $4.25 / $17.00.
    assert cost("gpt-4o", input_tokens=100, output_tokens=10, service_tier="priority") == (
        "0.000595"
    )
    assert cost("gpt-4o", input_tokens=100, output_tokens=10, service_tier="default") == "0.00035"
    # long context: gemini-2.5-pro above 200k input is billed $2.50 / $15.00 in full.
    assert cost("gemini-2.5-pro", input_tokens=200_000, output_tokens=1000) == "0.26"
    assert cost("gemini-2.5-pro", input_tokens=250_000, output_tokens=1000) == "0.64"
    # Anthropic cache writes at 1.25x input: claude-sonnet-4-5 $3.75 per 1M written.
    # 1000 uncached * 3 + 1000 cached * 0.30 + 1000 written * 3.75 = 7050 per 1M
    assert cost("claude-sonnet-4-5", input_tokens=3000, cache_write_tokens=1000,
                cached_input_tokens=1000, output_tokens=0) == "0.00705"  # fmt: skip
    # embeddings: input only.
    assert cost("text-embedding-3-small", input_tokens=1000) == "0.00002"
    # the smallest real price stays exact: gpt-5-nano cached at $0.005 per 1M.
    assert cost("gpt-5-nano", input_tokens=1, cached_input_tokens=1) == "0.000000005"


def test_worst_case_takes_the_dearest_tier() -> None:
    price = TABLE.resolve("gpt-4o")
    assert price is not None
    # priority: 100 * 4.25 + 50 * 17 = 425 + 850 = 1275 per 1M
    assert usd_exact(price.worst_case(100, 50)) == "0.001275"


GOOD = """updated: 2026-11-01
providers:
  acme:
    source: https://acme.example/pricing
    models:
      m1: {input: 1.0, output: 2.0}
"""


def test_price_in_the_wrong_unit_is_caught_with_file_line_and_hint() -> None:
    bad = GOOD.replace("input: 1.0", "input: 2.5e-06")
    with pytest.raises(PricingError) as e:
        parse_price_table(bad, "pricing.yaml")
    assert str(e.value) == (
        "pricing.yaml:6: key 'providers.acme.models.m1.input': bad value 2.5e-06: looks like a"
        " price per token; pricing.yaml is in USD per 1M tokens (did you mean 2.5?)"
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("input: 1.0", "input: -1"),
            "key 'providers.acme.models.m1.input': bad value -1: must be >= 0",
        ),
        (("input: 1.0", "input: cheap"), "bad value 'cheap': must be a number"),
        (("input: 1.0, ", ""), "key 'providers.acme.models.m1.input': is required"),
        (("m1: {", "m1: {inptu: 3, "), "key 'providers.acme.models.m1.inptu': unknown key"),
        (("updated: 2026-11-01", "updated: soon"), "must be a date YYYY-MM-DD"),
        (("source: https://acme.example/pricing", "x: 1"), "unknown key"),
        (("output: 2.0}", "output: 2.0, aliases: [m1]}"), "alias 'm1' is already taken"),
        (("input: 1.0", "input: 1.1234567"), "has more than 6 decimal places"),
    ],
)
def test_validation_errors_name_the_key_and_value(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(PricingError) as e:
        parse_price_table(GOOD.replace(*edit), "p.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("p.yaml")


def test_broken_yaml_names_the_line() -> None:
    with pytest.raises(PricingError) as e:
        parse_price_table(GOOD + "      m2: {input: [1\n", "p.yaml")
    assert str(e.value).startswith("p.yaml:8: not valid YAML")


def test_version_changes_with_content(tmp_path: Path) -> None:
    a = parse_price_table(GOOD)
    b = parse_price_table(GOOD.replace("2.0", "3.0"))
    assert a.version.startswith("2026-11-01+") and a.version != b.version
